"""`sparse-lm convert import-hf`: a dense Hugging Face Llama → a fresh step-0 Top-KAST checkpoint
(A and B the top of each layer by |θ|) plus the config.yaml that `sparse-lm pretrain` resumes it with."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sparse_lm.checkpoint.convert.staging import staged_output
from sparse_lm.errors import UserError


def import_hf(args: argparse.Namespace, out: Path) -> str:
    """Dense HF Llama → a step-0 sparse checkpoint root; returns the summary line."""
    import yaml

    from sparse_lm.atomic import write_json, write_text
    from sparse_lm.checkpoint.hf import (
        CHECKPOINTS,
        IMPORT_MARKER,
        RUN_CONFIG,
        load_hf_weights,
        model_config_from_hf,
        sparse_modules,
        write_fresh_checkpoint,
    )
    from sparse_lm.config import RunConfig, load_config
    from sparse_lm.data.tokenizer import Tokenizer
    from sparse_lm.model.build import build_model

    hf_dir = Path(args.source)
    if not hf_dir.is_dir():
        raise UserError(f"--from-hf {hf_dir}: not a directory")
    if args.density is None or args.exploration is None:
        raise UserError("import-hf needs --density D (forward set A) and --exploration M (B holds D + M)")
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
        for dim, what in ((m.d_model, "hidden_size"), (m.n_kv_heads * m.head_dim, "the k/v width"),
                          (m.ffn_hidden, "intermediate_size")):
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
        f"reshard --from {out / CHECKPOINTS} --to DIR --tensor {layout[0]} --pipeline {layout[1]})")
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
    print(import_hf(args, Path(args.to)))
    return 0


def register(actions) -> None:
    parser = actions.add_parser("import-hf", help="import a dense Hugging Face Llama as a sparse (Top-KAST) checkpoint")
    parser.add_argument("--from-hf", dest="source", required=True, metavar="HFDIR",
                        help="dense Hugging Face Llama directory to import")
    parser.add_argument("--to", required=True, metavar="OUT",
                        help="output directory (created; replaced only if an untouched earlier import)")
    parser.add_argument("--density", type=float, help="forward density D (A = top D of each layer by |θ|)")
    parser.add_argument("--exploration", type=float, help="exploration M (B = top D + M, the stored part)")
    parser.add_argument("--block-size", type=int, help="b×b block granularity (default: the config's)")
    parser.add_argument("--config", help="run config YAML for everything but the model shape (data.path, train.*)")
    parser.add_argument("--tokenizer", metavar="PATH.model",
                        help="sentencepiece model when HFDIR has no tokenizer.model")
    parser.add_argument("--complement", choices=("offload", "regenerate"), default="offload",
                        help="values outside B (default offload: keep the pretrained values on the host; "
                             "regenerate would replace them by the seeded initialisation)")
    parser.set_defaults(func=run)
