"""Hugging Face Llama ⇄ sparse_lm: config mapping, tensor renaming, and the two directory writers.

Our parameter names, rotate-half RoPE and GQA head order are Hugging Face's (model/llama.py), so a
conversion is a renaming — `model.` in front of every name but `lm_head.weight` — plus, for the
sparse linears, a change of storage:

* export (sparse → HF): a `SparseLinear` is written as its dense *forward-set* weight A
  (`dense_weight(forward_only=True)`), the weight the sparse model computes with; entries in B \\ A
  and outside B are zero. The HF model therefore reproduces the sparse model's logits — it is not
  a dense θ that Top-KAST never materialises.
* import (HF → sparse): every targeted linear keeps B = its top-(D+M) entries (or b×b blocks) by
  |θ| and A = the top-D, picked by the same block scores and exact select that
  `SparseLinear.initialize` applies to θ₀; every other tensor is copied. Density 1 with exploration
  0 keeps every entry, so HF → sparse → HF gives back identical tensors.

Everything is written as float32. Nothing here needs transformers: only `sparse-lm eval` on an HF
directory imports it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparse_lm.atomic import write_json
from sparse_lm.checkpoint.hf_tokenizer import TokenizerMismatch, write_hf_tokenizer
from sparse_lm.checkpoint.store import MANIFEST, write_offline_checkpoint
from sparse_lm.config import ModelConfig, RunConfig
from sparse_lm.data.tokenizer import Tokenizer
from sparse_lm.errors import UserError
from sparse_lm.model import Llama
from sparse_lm.optim_state import MOMENTS
from sparse_lm.sparsity.storage import SparseLinear

ARCHITECTURE = "LlamaForCausalLM"
EXPORT_MARKER = "sparse_lm_export.json"  # marks a directory `convert export-hf` may replace
IMPORT_MARKER = "sparse_lm_import.json"  # marks a checkpoint root `convert import-hf` may replace
RUN_CONFIG = "config.yaml"  # the imported run's config, for `sparse-lm pretrain --config`
CHECKPOINTS = "checkpoints"  # an import is laid out like a run directory: <out>/checkpoints/step_*
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # derived buffers some older exports carry


def hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def sparse_modules(model: torch.nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


# ---------------------------------------------------------------- export: sparse → HF
def hf_config(m: ModelConfig, ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM`; both rope spellings so transformers 4.x and 5.x read it."""
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_hidden,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": m.init_std, "use_cache": True,
        "torch_dtype": "float32", "dtype": "float32",
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": None,
    }


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors; a sparse linear contributes its dense forward-set weight A."""
    sparse = sparse_modules(model)
    out = {hf_key(f"{name}.weight"): layer.dense_weight(forward_only=True) for name, layer in sparse.items()}
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in sparse:
            out[hf_key(name)] = param.detach()
    return {k: v.float().cpu().contiguous() for k, v in out.items()}


def write_hf(model: Llama, cfg: RunConfig, tokenizer_model: Path, directory: Path, provenance: dict) -> dict:
    """Write a loadable HF Llama directory into `directory` (which the caller publishes); records in
    `provenance["tokenizer"]` whether tokenizer.json could be made (see hf_tokenizer)."""
    try:
        ids = write_hf_tokenizer(tokenizer_model, directory, cfg.model.max_seq_len)
        provenance["tokenizer"] = "tokenizer.json reproduces tokenizer.model's ids"
    except TokenizerMismatch as exc:  # still a usable export: sentencepiece users load tokenizer.model
        sp = Tokenizer(tokenizer_model)
        ids = {"bos": sp.bos_id if sp.bos_id >= 0 else None, "eos": sp.eos_id if sp.eos_id >= 0 else None}
        provenance["tokenizer"] = f"tokenizer.model only; not converted: {exc}"
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")  # for sentencepiece users and `eval`
    tensors = hf_state_dict(model)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600; an export is for sharing
    write_json(directory / "config.json", hf_config(cfg.model, ids))
    write_json(directory / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]})
    write_json(directory / EXPORT_MARKER, provenance)
    return tensors


# ---------------------------------------------------------------- import: HF → sparse
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} {path.parent}: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"file {path}: not valid JSON") from None


def model_config_from_hf(hf_dir: Path) -> ModelConfig:
    """Our ModelConfig for a HF Llama config.json; anything we would compute differently is refused."""
    path = hf_dir / "config.json"
    c = _read_json(path, "Hugging Face directory")
    arch = c.get("architectures") or [c.get("model_type")]
    if c.get("model_type") != "llama" or arch != [ARCHITECTURE]:
        raise UserError(f"file {path}: architecture {arch} (model_type {c.get('model_type')!r}) is not supported; "
                        f"expected {ARCHITECTURE} (model_type 'llama')")

    def refuse(field: str, expected: str) -> None:
        raise UserError(f"file {path}: field {field} is {c.get(field)!r}; sparse_lm supports {expected}")

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(c.get(field), int) or c[field] < 1:
            refuse(field, "a positive integer")
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "silu (SwiGLU)")
    for field in ("attention_bias", "mlp_bias"):
        if c.get(field):
            refuse(field, "false (no biases)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters" if "rope_parameters" in c else "rope_scaling", "plain RoPE (rope_type default)")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads) or c["hidden_size"] % heads:
        refuse("head_dim", f"hidden_size / num_attention_heads = {c['hidden_size'] / heads:g}")
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads, ffn_hidden=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=float(c.get("initializer_range", 0.02)),
    )


def hf_weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a single file or a sharded index."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index, "Hugging Face directory").get("weight_map", {})
        files = sorted({hf_dir / f for f in weight_map.values()})
    else:
        raise UserError(f"Hugging Face directory {hf_dir}: no model.safetensors or model.safetensors.index.json "
                        "(only safetensors weights are read)")
    where = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                where.update(dict.fromkeys(handle.keys(), file))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"file {file}: unreadable safetensors ({exc})") from None
    return where


def select_from_dense(layer: SparseLinear, weight: torch.Tensor) -> None:
    """B = the top-(D+M) blocks of |weight|, A = the top-D: `SparseLinear.initialize` with `weight`
    in place of θ₀. With `complement: offload` the whole weight becomes the complement store."""
    b = layer.block
    rows: Callable[[int, int], torch.Tensor] = lambda r0, r1: weight[r0 * b : r1 * b]  # noqa: E731
    if layer.complement_policy == "offload":
        layer.complement.copy_(weight)
    layer.place(layer.choose(rows), rows)
    layer.forward_mask.copy_(layer.select_forward())


@torch.no_grad()
def load_hf_weights(model: Llama, hf_dir: Path) -> None:
    """Fill `model` from the HF safetensors, one tensor at a time (peak: one dense weight)."""
    where = hf_weight_files(hf_dir)
    used = set()

    def tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in where:
            raise UserError(f"Hugging Face directory {hf_dir}: tensor {key} is missing")
        with safe_open(where[key], framework="pt") as handle:
            value = handle.get_tensor(key)
        if tuple(value.shape) != tuple(shape):
            raise UserError(f"file {where[key]}: tensor {key} has shape {list(value.shape)}, "
                            f"config.json implies {list(shape)}")
        used.add(key)
        return value.float()

    sparse = sparse_modules(model)
    for name, layer in sparse.items():
        select_from_dense(layer, tensor(hf_key(f"{name}.weight"), layer.shape))
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in sparse:
            param.copy_(tensor(hf_key(name), param.shape))
    if model.cfg.tie_embeddings:
        used.add("lm_head.weight")  # some exports store the tied copy too
    extra = sorted(k for k in where if k not in used and not k.endswith(IGNORED_HF_TENSORS))
    if extra:
        raise UserError(f"Hugging Face directory {hf_dir}: {len(extra)} tensors have no place in a Llama of this "
                        f"config.json, e.g. {extra[:3]}")


def write_fresh_checkpoint(root: Path, model: Llama, cfg: RunConfig, tokenizer_model: Path,
                           step: int = 0, state: dict | None = None) -> Path:
    """A 1×1-topology checkpoint of `model` with zero Adam moments under `root` (+ `latest`).

    Not `store.save_checkpoint`: that gathers moments from a live (DeepSpeed) optimizer over a
    process group; an imported model has neither, and its moments are zeros by definition. The
    layout and manifest are the store's, so `sparse-lm pretrain` resumes from it.
    """
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    moments = {f"{name}.{key}": torch.zeros(p.shape) for name, p in model.named_parameters()
               if p.requires_grad for key in MOMENTS}
    return write_offline_checkpoint(root, step, {(0, 0): (weights, moments)}, {"tensor": 1, "pipeline": 1, "data": 1},
                                    cfg.to_dict(), state or {"step": step, "samples_seen": 0, "tokens_seen": 0}, 0,
                                    tokenizer_model)


# ---------------------------------------------------------------- eval on an HF directory
def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not (path / MANIFEST).is_file()


class _HFTokenizer:
    """What `eval` and `generate` need from a tokenizer, for an HF directory without tokenizer.model."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        if self._tok.eos_token_id is None:
            raise UserError(f"Hugging Face directory {path}: its tokenizer has no EOS token "
                            "(documents are joined by EOS)")
        self.eos_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)


def load_hf_for_eval(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """{logits_fn, model, tokenizer, seq_len, max_seq_len, data_path, step} for an HF Llama directory,
    its model on `device`.

    The tokenizer is our tokenizer.model when the directory has one (every export does), else the
    HF tokenizer; the default context and data path come from the export's marker when present.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError, SafetensorError) as exc:  # a truncated model.safetensors: SafetensorError
        raise UserError(
            f"Hugging Face directory {path}: transformers cannot load it ({str(exc).splitlines()[0]})"
        ) from None
    marker = _read_json(path / EXPORT_MARKER, "Hugging Face directory") if (path / EXPORT_MARKER).is_file() else {}
    if (path / "tokenizer.model").is_file():
        from sparse_lm.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(path / "tokenizer.model")
    else:
        tokenizer = _HFTokenizer(path)
    max_len = int(model.config.max_position_embeddings)
    return {
        "logits_fn": lambda ids: model(input_ids=ids, use_cache=False).logits,
        "model": model,
        "tokenizer": tokenizer,
        "seq_len": min(int(marker.get("seq_len", max_len)), max_len),
        "max_seq_len": max_len,
        "data_path": marker.get("data_path"),
        "step": marker.get("step"),
    }
