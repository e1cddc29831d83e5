"""`sparse-lm convert reshard`: a checkpoint → the same checkpoint for another tensor × pipeline
layout (`checkpoint.reshard`), which `sparse-lm pretrain --resume` continues on that layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_lm.checkpoint.convert.staging import staged_output
from sparse_lm.errors import UserError

RESHARD_MARKER = "sparse_lm_reshard.json"  # marks a checkpoint root `convert reshard` may replace


def reshard(source: str, out: Path, tensor: int, pipeline: int, drop_optimizer: bool,
            headroom: float | None = None) -> str:
    """Checkpoint → the same checkpoint for another tensor × pipeline layout; returns the summary line."""
    from sparse_lm.atomic import write_json
    from sparse_lm.checkpoint.reshard import reshard_checkpoint
    from sparse_lm.checkpoint.store import find_checkpoint, read_manifest, verify_files

    if tensor < 1 or pipeline < 1:
        raise UserError(f"--tensor {tensor} --pipeline {pipeline}: expected integers >= 1")
    step_dir = find_checkpoint(source)
    manifest = read_manifest(step_dir)
    verify_files(step_dir, manifest, ["tokenizer.model"])
    with staged_output(out, RESHARD_MARKER, "re-shard") as tmp:
        new = reshard_checkpoint(step_dir, tmp, tensor, pipeline, drop_optimizer, headroom)
        write_json(tmp / RESHARD_MARKER, {"source": str(step_dir.resolve()), "step": manifest["step"], "tensor": tensor,
                                          "pipeline": pipeline, "optimizer": "dropped" if drop_optimizer else "kept"})
    old = manifest["topology"]
    headroom = manifest["config"]["parallel"]["shard_headroom"] if headroom is None else headroom
    return (f"re-sharded step {manifest['step']} of {step_dir} from tensor={old['tensor']} pipeline={old['pipeline']} "
            f"to tensor={tensor} pipeline={pipeline} in {out / new.name} (Adam state "
            f"{'dropped' if drop_optimizer else 'kept'}); continue with: sparse-lm pretrain --config CONFIG "
            f"--set checkpoint.dir={out} --set parallel.tensor={tensor} --set parallel.pipeline={pipeline} "
            f"--set parallel.shard_headroom={headroom} --resume")


def run(args: argparse.Namespace) -> int:
    print(reshard(args.source, Path(args.to), args.tensor, args.pipeline, args.drop_optimizer, args.shard_headroom))
    return 0


def register(actions) -> None:
    parser = actions.add_parser("reshard", help="rewrite a checkpoint for another tensor/pipeline layout")
    parser.add_argument("--from", dest="source", required=True, metavar="CKPT",
                        help="checkpoint to re-shard: a step_* dir or a checkpoint root (its latest)")
    parser.add_argument("--to", required=True, metavar="OUT",
                        help="new checkpoint root (created; replaced only if an untouched earlier re-shard)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size of the new checkpoint (default 1)")
    parser.add_argument("--pipeline", type=int, default=1,
                        help="pipeline-parallel size of the new checkpoint (default 1)")
    parser.add_argument("--drop-optimizer", action="store_true",
                        help="write zero Adam moments instead of carrying them")
    parser.add_argument("--shard-headroom", type=float, metavar="H", help="parallel.shard_headroom of the new "
                        "checkpoint (spare slots per tensor-parallel shard; default: the saved one); "
                        "resume with the same")
    parser.set_defaults(func=run)
