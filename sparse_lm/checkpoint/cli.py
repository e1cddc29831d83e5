"""`sparse-lm checkpoint verify DIR`: the load-time checks, standalone, before a long job relies
on a checkpoint (after a copy between clusters, or a crash)."""

from __future__ import annotations

import argparse
import json

from sparse_lm.checkpoint.store import find_checkpoint, read_manifest, verify_files
from sparse_lm.errors import UserError


def verify(path: str) -> dict:
    """Manifest readable and of a known version, every listed file present with the recorded size
    and sha256, every safetensors file parseable. Raises UserError naming the first bad file."""
    from safetensors import SafetensorError, safe_open

    step_dir = find_checkpoint(path)
    manifest = read_manifest(step_dir)
    verify_files(step_dir, manifest)
    tensors = 0
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            try:
                with safe_open(step_dir / name, "pt") as f:
                    tensors += len(list(f.keys()))
            except (SafetensorError, OSError) as exc:
                raise UserError(f"checkpoint file {step_dir / name}: unreadable safetensors ({exc})") from None
    return {
        "checkpoint": str(step_dir),
        "step": manifest["step"],
        "topology": manifest["topology"],
        "files": len(manifest["files"]),
        "bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "tensors": tensors,
    }


def run(args: argparse.Namespace) -> int:
    report = verify(args.dir)
    print(f"ok: {report['checkpoint']} step {report['step']}, {report['files']} files, "
          f"{report['bytes']:,} bytes, {report['tensors']} tensors, topology {json.dumps(report['topology'])}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("checkpoint", help="checkpoint utilities (verify)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("verify", help="check a checkpoint's manifest, sizes, sha256 and tensor files")
    check.add_argument("dir", help="a step_* directory or a checkpoint root (its `latest`)")
    check.set_defaults(func=run)
