"""`sparse-lm pretrain`: the config system in front of `train.loop.pretrain`."""

from __future__ import annotations

import argparse
import os

from sparse_lm.atomic import check_writable, write_json
from sparse_lm.config import load_config


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
        help="override config fields, e.g. --set train.steps=200 train.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="require resuming from checkpoint.dir's latest")
    # The `deepspeed` launcher appends --local_rank; LOCAL_RANK in the environment carries the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from sparse_lm.train.preflight import check_run

    overrides = list(args.overrides) + (["checkpoint.resume=must"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        from sparse_lm.config_print import config_yaml

        sets = "".join(f" --set {item}" for item in overrides)
        print(config_yaml(cfg, f"{args.config}{sets}"), end="")
        return 0
    writes_summary = args.summary_json and os.environ.get("RANK", "0") == "0"
    if writes_summary:
        check_writable(args.summary_json, "--summary-json", is_file=True)
    plan = check_run(cfg)  # before DeepSpeed and megatron-core are even imported

    from sparse_lm.train.loop import pretrain

    summary = pretrain(cfg, plan)
    if writes_summary:
        write_json(args.summary_json, summary)
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="train a model (dense or sparse) per a YAML config")
    add_run_args(parser)
    parser.add_argument("--summary-json", default=None, help="also write the final summary here")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, every field documented) and exit without training")
    parser.set_defaults(func=run)
