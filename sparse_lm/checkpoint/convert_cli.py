"""`sparse-lm convert`: a checkpoint → a Hugging Face Llama directory (`--from CKPT --format hf`), a
checkpoint → the same checkpoint for another tensor × pipeline layout (`--from CKPT --tensor T
--pipeline P`), or a dense Hugging Face Llama → a fresh sparse checkpoint (`--from-hf HFDIR`) that
`sparse-lm pretrain` resumes from.

All three write into a temporary sibling of `--to` and rename it into place (`atomic.publish_dir`),
so an interrupted convert never leaves a half-written output, and a failed write is one line. An
existing non-empty `--to` is replaced only when it is an earlier output of the same direction (its
marker file is there) — never a directory of something else, and never an import or re-shard root
that training has since added steps to.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Iterator

from sparse_lm.errors import UserError

FORMATS = ("hf",)


def _fsync_tree(root: Path) -> None:
    """publish_dir syncs the top level only; an import root also has a step directory."""
    from sparse_lm.atomic import fsync_dir, fsync_file

    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)


@contextlib.contextmanager
def staged_output(out: Path, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds. `what` (import,
    re-shard, export) names the direction in messages; an earlier output's marker may record the
    step it wrote (`step`, default 0): any other step under `out` is training progress since."""
    from sparse_lm.atomic import publish_dir, staging_dir, staging_name
    from sparse_lm.checkpoint.store import WRITE_ERRORS, step_dir_name

    if out.exists() and not out.is_dir():
        raise UserError(f"--to {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise UserError(f"--to {out}: exists, is not empty and is not an earlier `sparse-lm convert` output "
                            f"(no {marker}); choose a new directory or remove it")
        try:
            written = step_dir_name(int(json.loads((out / marker).read_text()).get("step", 0)))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            raise UserError(f"--to {out}: {marker} is not the JSON an earlier `sparse-lm convert` wrote; "
                            "choose a new directory or remove it") from None
        later = sorted(p.name for p in out.rglob("step_*") if p.name != written)
        if later or (out / "metrics.jsonl").exists():
            raise UserError(f"--to {out}: holds training progress made after the {what} "
                            f"({later[-1] if later else 'metrics.jsonl'}); refusing to overwrite it")
    tmp = staging_name(out)
    try:
        staging_dir(out)
        yield tmp
        _fsync_tree(tmp)
        publish_dir(tmp, out)
    except WRITE_ERRORS as exc:  # full disk, quota, no permission: `out` is as it was (publish_dir)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise UserError(f"--to {out}: writing the {what} failed ({reason}); nothing there was changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(source: str, out: Path) -> str:
    """Checkpoint → HF directory; returns the summary line."""
    from sparse_lm.checkpoint.hf import CHECKPOINTS, EXPORT_MARKER, sparse_modules, write_hf
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.checkpoint.store import LATEST, MANIFEST, find_checkpoint, read_manifest, verify_files

    if not any((Path(source) / f).exists() for f in (MANIFEST, LATEST)) and (Path(source) / CHECKPOINTS).is_dir():
        source = str(Path(source) / CHECKPOINTS)  # a run or import directory: its checkpoints
    step_dir = find_checkpoint(source)
    manifest = read_manifest(step_dir)
    verify_files(step_dir, manifest, ["tokenizer.model"])
    # Verifies the model shard; no θ₀ initialisation, as every saved tensor is loaded over it.
    model, cfg, manifest = load_trained_model(step_dir, initialize=False)
    layers = list(sparse_modules(model).values())
    forward = (sum(l.k_forward * l.block**2 for l in layers) / sum(l.global_blocks * l.block**2 for l in layers)
               if layers else 1.0)
    provenance = {
        "format": "hf", "source": str(step_dir), "step": manifest["step"], "method": cfg.sparsity.method,
        "forward_density": forward, "seq_len": cfg.train.seq_len, "data_path": cfg.data.path,
        "note": "sparse linears are written as their dense forward-set weight A (zeros outside A)",
    }
    with staged_output(out, EXPORT_MARKER, "export") as tmp:
        tensors = write_hf(model, cfg, step_dir / "tokenizer.model", tmp, provenance)
    n_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    what = (f"{len(layers)} {cfg.sparsity.method} linears written as their forward set A (density {forward:.3f})"
            if layers else "a dense model")
    note = "" if provenance["tokenizer"].startswith("tokenizer.json") else f"\nnote: {provenance['tokenizer']}"
    return (f"exported step {manifest['step']} of {step_dir} to {out}: {len(tensors)} tensors, "
            f"{n_bytes / 2**20:.1f} MiB float32; {what}{note}")


RESHARD_MARKER = "sparse_lm_reshard.json"  # marks a checkpoint root `convert --tensor/--pipeline` may replace


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


def import_hf(args: argparse.Namespace, out: Path) -> str:
    """Dense HF Llama → a step-0 sparse checkpoint root; returns the summary line."""
    import yaml

    from sparse_lm.atomic import write_json, write_text
    from sparse_lm.checkpoint.hf import CHECKPOINTS, IMPORT_MARKER, RUN_CONFIG, load_hf_weights, \
        model_config_from_hf, sparse_modules, write_fresh_checkpoint
    from sparse_lm.config import RunConfig, load_config
    from sparse_lm.data.tokenizer import Tokenizer
    from sparse_lm.model.build import build_model

    hf_dir = Path(args.from_hf)
    if not hf_dir.is_dir():
        raise UserError(f"--from-hf {hf_dir}: not a directory")
    if args.density is None or args.exploration is None:
        raise UserError("--from-hf needs --density D (forward set A) and --exploration M (B holds D + M)")
    model_cfg = model_config_from_hf(hf_dir)
    tokenizer_model = hf_dir / "tokenizer.model"
    if not tokenizer_model.is_file():
        if args.tokenizer is None:
            raise UserError(f"--from-hf {hf_dir}: has no tokenizer.model; pass the sentencepiece model with "
                            "--tokenizer PATH.model (checkpoints carry one)")
        tokenizer_model = Path(args.tokenizer)
    tokenizer = Tokenizer(tokenizer_model)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer_model}: {tokenizer.vocab_size} pieces, more than the model's "
                        f"vocab_size {model_cfg.vocab_size} in {hf_dir / 'config.json'}")

    cfg = load_config(args.config) if args.config else RunConfig()
    cfg.model = model_cfg
    # The checkpoint is one process's (1×1): a config saying otherwise would make the printed
    # `pretrain --config` refuse it. The asked-for layout is one re-shard away.
    layout = (cfg.parallel.tensor, cfg.parallel.pipeline)
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor=1, pipeline=1)
    s = cfg.sparsity
    s.method, s.density, s.exploration, s.complement = "topkast", args.density, args.exploration, args.complement
    if args.block_size is not None:
        s.granularity, s.block_size = ("block" if args.block_size > 1 else "element"), args.block_size
    if s.granularity == "block":
        m = model_cfg
        for dim, what in ((m.d_model, "hidden_size"), (m.kv_heads * m.head_dim, "the k/v width"),
                          (m.ffn_dim, "intermediate_size")):
            if s.block_size < 1 or dim % s.block_size:
                raise UserError(f"--block-size {s.block_size}: does not divide {what} = {dim} "
                                f"({hf_dir / 'config.json'}); sparse blocks tile every layer exactly")
    cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_seq_len)
    # `pretrain --config <out>/config.yaml` trains in <out> (metrics, <out>/checkpoints) and must
    # resume from the import: were the path wrong, a silent fresh start would discard the weights.
    cfg.train.out_dir, cfg.checkpoint.dir, cfg.checkpoint.resume = str(out.resolve()), "", "must"
    cfg.validate()

    model = build_model(cfg, initialize=False)  # every tensor comes from the HF weights
    load_hf_weights(model, hf_dir)
    layers = list(sparse_modules(model).values())
    reshard_hint = "" if layout == (1, 1) else (
        f" (one process; for tensor={layout[0]} pipeline={layout[1]} as --config asks, first: sparse-lm convert "
        f"--from {out / CHECKPOINTS} --to DIR --tensor {layout[0]} --pipeline {layout[1]})")
    with staged_output(out, IMPORT_MARKER, "import") as tmp:
        step_dir = write_fresh_checkpoint(tmp / CHECKPOINTS, model, cfg, tokenizer_model)
        write_text(tmp / RUN_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(tmp / IMPORT_MARKER, {"source": str(hf_dir.resolve()), "density": s.density,
                                         "exploration": s.exploration, "block": s.block, "complement": s.complement})
    return (f"imported {hf_dir} into {out / CHECKPOINTS / step_dir.name}: {len(layers)} top-kast linears, A = top "
            f"{s.density:g}, B = top {s.density + s.exploration:g} of each by |θ| ({s.block}x{s.block} blocks), "
            f"complement {s.complement}, Adam moments zero; continue with: "
            f"sparse-lm pretrain --config {out / RUN_CONFIG}" + reshard_hint)


def run(args: argparse.Namespace) -> int:
    out = Path(args.to)
    if args.format not in FORMATS:
        raise UserError(f"--format {args.format!r}: unknown; expected one of: {', '.join(FORMATS)}")
    if args.source is not None:
        extra = [f for f in ("density", "exploration", "block_size", "config", "tokenizer") if getattr(args, f) is not None]
        if extra:
            raise UserError(f"--{extra[0].replace('_', '-')}: applies to --from-hf only")
        if args.tensor is not None or args.pipeline is not None:  # an explicit 0 must reach the check
            print(reshard(args.source, out, 1 if args.tensor is None else args.tensor,
                          1 if args.pipeline is None else args.pipeline, args.drop_optimizer, args.shard_headroom))
        elif args.shard_headroom is not None or args.drop_optimizer:
            raise UserError("--shard-headroom/--drop-optimizer: apply to a re-shard (--tensor/--pipeline) only")
        else:
            print(export_hf(args.source, out))
    else:
        if args.tensor is not None or args.pipeline is not None or args.drop_optimizer or args.shard_headroom is not None:
            raise UserError("--tensor/--pipeline/--drop-optimizer/--shard-headroom: re-shard a checkpoint (--from CKPT); an import "
                            "writes a one-process checkpoint that can be re-sharded afterwards")
        print(import_hf(args, out))
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="export a checkpoint to Hugging Face, re-shard it for another "
                                   "tensor/pipeline layout, or import a Hugging Face Llama as sparse")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", metavar="CKPT", help="checkpoint to export: a step_* dir, a checkpoint root or a run directory")
    source.add_argument("--from-hf", metavar="HFDIR", help="dense Hugging Face Llama directory to import")
    parser.add_argument("--to", required=True, metavar="OUT", help="output directory (created; replaced only if an earlier convert output)")
    parser.add_argument("--format", default="hf", help="export format (default and only: hf)")
    parser.add_argument("--tensor", type=int, help="re-shard CKPT for this tensor-parallel size (1 if only --pipeline is given)")
    parser.add_argument("--pipeline", type=int, help="re-shard CKPT for this pipeline-parallel size (1 if only --tensor is given)")
    parser.add_argument("--drop-optimizer", action="store_true", help="re-shard: write zero Adam moments instead of carrying them")
    parser.add_argument("--shard-headroom", type=float, metavar="H", help="re-shard: parallel.shard_headroom of the new "
                        "checkpoint (spare slots per tensor-parallel shard; default: the saved one); resume with the same")
    parser.add_argument("--density", type=float, help="import: forward density D (A = top D of each layer by |θ|)")
    parser.add_argument("--exploration", type=float, help="import: exploration M (B = top D + M, the stored part)")
    parser.add_argument("--block-size", type=int, help="import: b×b block granularity (default: the config's)")
    parser.add_argument("--config", help="import: run config YAML for everything but the model shape (data.path, train.*)")
    parser.add_argument("--tokenizer", metavar="PATH.model", help="import: sentencepiece model when HFDIR has no tokenizer.model")
    parser.add_argument("--complement", choices=("offload", "regenerate"), default="offload",
                        help="import: values outside B (default offload: keep the pretrained values on the host; "
                             "regenerate would replace them by the seeded initialisation)")
    parser.set_defaults(func=run)
