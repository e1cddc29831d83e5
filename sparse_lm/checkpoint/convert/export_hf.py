"""`sparse-lm convert export-hf`: a checkpoint → a Hugging Face Llama directory that transformers
loads as `LlamaForCausalLM` (sparse linears written as their dense forward-set weight A)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_lm.checkpoint.convert.staging import staged_output


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
    forward = (sum(m.k_forward * m.block**2 for m in layers) / sum(m.global_blocks * m.block**2 for m in layers)
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


def run(args: argparse.Namespace) -> int:
    print(export_hf(args.source, Path(args.to)))
    return 0


def register(actions) -> None:
    parser = actions.add_parser("export-hf", help="write a checkpoint as a Hugging Face Llama directory")
    parser.add_argument("--from", dest="source", required=True, metavar="CKPT",
                        help="checkpoint to export: a step_* dir, a checkpoint root or a run directory")
    parser.add_argument("--to", required=True, metavar="OUT",
                        help="output directory (created; replaced only if an earlier export)")
    parser.set_defaults(func=run)
