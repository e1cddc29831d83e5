"""`sparse-lm <command>`: one CLI for every user task.

Each command lives with the code it drives and registers itself through `register_cli(subparsers)`;
this module only wires them and turns a `UserError`, or a SIGTERM, into one clear line and exit
status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from sparse_lm.errors import UserError
from sparse_lm.termination import SigtermGuard, Terminated, stopped_by_sigterm


def build_parser() -> argparse.ArgumentParser:
    from sparse_lm.checkpoint.cli import register_cli as register_checkpoint
    from sparse_lm.checkpoint.convert import register_cli as register_convert
    from sparse_lm.data.prepare import register_cli as register_prepare
    from sparse_lm.eval.cli import register_cli as register_eval
    from sparse_lm.generate.cli import register_cli as register_generate
    from sparse_lm.plan.cli import register_cli as register_plan
    from sparse_lm.report.cli import register_cli as register_report
    from sparse_lm.train.cli import register_cli as register_pretrain

    parser = argparse.ArgumentParser(prog="sparse-lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_prepare(sub)
    register_pretrain(sub)
    register_eval(sub)
    register_generate(sub)
    register_report(sub)
    register_convert(sub)
    register_checkpoint(sub)
    register_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sparse_lm.checkpoint.convert import flag_form_pointer

    argv = sys.argv[1:] if argv is None else list(argv)
    pointer = flag_form_pointer(argv)
    if pointer is not None:
        print(f"sparse-lm convert: error: {pointer}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    with SigtermGuard() as guard:
        try:
            return int(args.func(args) or 0)
        except UserError as exc:
            guard.quiet()
            message = str(exc)
        except Terminated:
            message = stopped_by_sigterm(os.environ.get("RANK", "0"))
        print(f"sparse-lm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
