"""On-disk checkpoints: a directory per step with a manifest, per-rank safetensors shards and a `latest` pointer.

Layout of `<root>/step_00000100/`:
  manifest.json                      format version, config, topology, step, tokens, data position,
                                     optimizer step, and size + sha256 of every other file
  model-tp00-pp00.safetensors        this (tensor, pipeline) rank's parameters and buffers; where
                                     DeepSpeed keeps fp32 masters (ZeRO, bf16), the masters
  optim-tp00-pp00.safetensors        their Adam moments, keyed `<param>.exp_avg` / `<param>.exp_avg_sq`
  rng-rank00000.safetensors          each rank's RNG state
  tokenizer.model                    so a checkpoint evaluates and exports on its own

Optimizer moments are stored per parameter (not as DeepSpeed's flat partitions) so that a checkpoint
does not depend on the data-parallel size or ZeRO stage, and conversion can re-shard them.
Every write goes to `.tmp-step_…` (`atomic.staging_dir`) first and is renamed only when complete; `latest` moves last.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sparse_lm import faults
from sparse_lm.atomic import publish_dir, recover_dir, sha256_file, staging_dir, staging_name, write_json, write_text
from sparse_lm.errors import UserError
from sparse_lm.optim_state import MOMENTS, ensure_state, get_moment, partitioned, set_moment
from sparse_lm.parallel.layout import canonical_name
from sparse_lm.parallel.state import Topology

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_KEYS = ("step", "optimizer_step", "topology", "config", "state", "files")  # what readers index
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def shard_name(kind: str, tp_rank: int, pp_rank: int) -> str:
    return f"{kind}-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- optimizer state
def _optimizer_step(optimizer) -> int:
    """Adam's bias-correction step count (all parameters share it: they step together)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _masters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master of every parameter DeepSpeed keeps one for (ZeRO, bf16), by canonical name:
    in a bf16 run the model's own copy is the master rounded to bf16, and saving that would lose
    every update below bf16's resolution at each resume. Collective under ZeRO (all ranks call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {canonical_name(name): safe_get_full_fp32_param(param).detach().float().cpu().contiguous()
            for name, param in model.named_parameters() if partitioned(param)}


@torch.no_grad()
def _restore_masters(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Set DeepSpeed's fp32 masters (made from the initial weights, which would undo the load at
    the next step) to the saved values — the saved masters of a bf16 run, not the model's
    bf16-rounded copy of them."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in model.named_parameters():
        if partitioned(param):
            safe_set_full_fp32_param(param, weights[canonical_name(name)].to(param.device, torch.float32))


def _restore_optimizer(optimizer, model: torch.nn.Module, weights: Mapping, tensors: Mapping, step: int) -> None:
    """Rebuild Adam's per-parameter state before the first step (torch and DeepSpeed create it
    lazily), after pointing DeepSpeed's master weights at the loaded ones."""
    _restore_masters(model, weights)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ensure_state(optimizer, [p for _, p in params], step)
    for name, param in params:
        for key in MOMENTS:
            set_moment(optimizer, param, key, tensors[f"{canonical_name(name)}.{key}"])


# ---------------------------------------------------------------- save
def _refuse_non_finite(model: torch.nn.Module, step: int, device: torch.device) -> None:
    """Never save NaN/inf weights over good checkpoints; decided on all ranks alike (all-reduce),
    so no rank is left waiting in the save's barriers. The count lives on the run's device: on a
    GPU the process group is NCCL, which has no CPU tensors."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in model.state_dict().values() if t.is_floating_point())
    flag = torch.tensor([float(bad)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    if flag.item():
        raise UserError(f"step {step}: the model holds {int(flag.item())} non-finite values; not saving a checkpoint")


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    topo: Topology,
    state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_path: str | Path,
    keep: int,
) -> Path:
    """Collectively write step `step`; returns the published directory. All ranks must call it."""
    _refuse_non_finite(model, step, topo.device)
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = staging_name(final, shared=True)  # every rank writes its shards into it
    if topo.is_main:
        staging_dir(final, shared=True)  # removing one left by a run killed mid-save
    _barrier()

    moments = {  # every rank takes part: under ZeRO the moments are gathered collectively
        f"{canonical_name(name)}.{key}": get_moment(optimizer, param, key)
        for name, param in model.named_parameters()
        if param.requires_grad
        for key in MOMENTS
    }
    masters = _masters(model)
    try:
        if topo.dp_rank == 0:
            weights = {canonical_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            weights.update(masters)
            save_file(weights, tmp / shard_name("model", topo.tp_rank, topo.pp_rank))
            faults.maybe_fill_disk_in_save(step, tmp)
            save_file(moments, tmp / shard_name("optim", topo.tp_rank, topo.pp_rank))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng-rank{topo.rank:05d}.safetensors")
    except WRITE_ERRORS as exc:  # out of disk, quota, a vanished mount: the published checkpoints are untouched
        _write_failed(root, step, tmp, exc)
    faults.maybe_kill_in_save(step)
    _barrier()

    if topo.is_main:
        try:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
            files = {
                p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in sorted(tmp.iterdir()) if p.is_file()
            }
            topology = {"tensor": topo.tensor, "pipeline": topo.pipeline, "data": topo.data}
            write_json(tmp / MANIFEST, _manifest(step, _optimizer_step(optimizer), topology, config, state, files))
            publish_dir(tmp, final)
            write_text(root / LATEST, final.name + "\n")
            prune(root, keep)
        except WRITE_ERRORS as exc:
            _write_failed(root, step, tmp, exc)
    _barrier()
    return final


def _manifest(step: int, optimizer_step: int, topology: dict, config: dict, state: dict, files: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": step,
        "optimizer_step": optimizer_step,
        "topology": topology,
        "config": config,
        "state": state,
        "files": files,
    }


def write_offline_checkpoint(root: Path, step: int, shards: dict[tuple[int, int], tuple[dict, dict]],
                             topology: dict, config: dict, state: dict, optimizer_step: int,
                             tokenizer_model: Path) -> Path:
    """A checkpoint written by one process (import, re-shard): `shards[(tp, pp)]` = (model tensors,
    Adam moments). `root` must be a staging directory the caller publishes atomically."""
    step_dir = root / step_dir_name(step)
    step_dir.mkdir(parents=True)
    for (tp, pp), (weights, moments) in sorted(shards.items()):
        save_file({k: v.contiguous() for k, v in weights.items()}, step_dir / shard_name("model", tp, pp))
        save_file({k: v.contiguous() for k, v in moments.items()}, step_dir / shard_name("optim", tp, pp))
    shutil.copyfile(tokenizer_model, step_dir / "tokenizer.model")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(step_dir.iterdir())}
    write_json(step_dir / MANIFEST, _manifest(step, optimizer_step, topology, config, state, files))
    write_text(root / LATEST, step_dir.name + "\n")
    return step_dir


# What a failed write raises: OSError from Python's own I/O, SafetensorError ("I/O error: File too
# large (os error 27)") from safetensors' writer.
WRITE_ERRORS = (OSError, SafetensorError)


def _write_failed(root: Path, step: int, tmp: Path, exc: Exception) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # the partial step; `latest` and earlier steps are never touched
    last = read_latest(root)
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
    raise UserError(f"checkpoint.dir {root}: writing step {step} failed ({reason}); the last complete "
                    f"checkpoint ({last.name if last else 'none'}) is untouched — free space and resume") from None


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; never the one `latest` names."""
    latest = read_latest(root)
    steps = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    removed = []
    for path in steps[:-keep]:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------- find and verify
def read_latest(root: Path) -> Path | None:
    """The step directory `latest` names, if complete (put back first if a crash while re-saving
    it left it moved aside: `atomic.recover_dir`)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    recover_dir(path)
    return path if (path / MANIFEST).is_file() else None


def find_checkpoint(path: str | Path) -> Path:
    """Accept a step directory or a checkpoint root (then its `latest`, else the newest step)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise UserError(f"checkpoint {path}: not found")
    latest = read_latest(path)
    if latest is not None:
        return latest
    steps = sorted(p for p in path.glob("step_*") if (p / MANIFEST).is_file())
    if not steps:
        raise UserError(f"checkpoint {path}: no {MANIFEST} here and no step_* checkpoint below it")
    return steps[-1]


def read_manifest(step_dir: Path) -> dict[str, Any]:
    path = step_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {step_dir}: {MANIFEST} is missing (incomplete save?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint file {path}: not valid JSON (corrupt or truncated)") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(
            f"checkpoint file {path}: format version {version!r}, this sparse_lm reads version {FORMAT_VERSION}"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise UserError(f"checkpoint file {path}: no {missing[0]!r} field (expected {', '.join(MANIFEST_KEYS)})")
    return manifest


def verify_files(step_dir: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check size and sha256 of the named files (default: all) against the manifest."""
    files = manifest["files"]
    for name in names if names is not None else sorted(files):
        if name not in files:
            raise UserError(f"checkpoint {step_dir}: {name} is not listed in {MANIFEST}")
        path = step_dir / name
        if not path.is_file():
            raise UserError(f"checkpoint file {path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            raise UserError(f"checkpoint file {path}: {size} bytes, manifest says {files[name]['bytes']} (truncated?)")
        if sha256_file(path) != files[name]["sha256"]:
            raise UserError(f"checkpoint file {path}: sha256 does not match {MANIFEST} (corrupt)")


def tokenized_alike(manifest: dict[str, Any], data_meta: dict[str, Any]) -> bool:
    """Whether a prepared dataset (its meta.json) was tokenised with the checkpoint's tokenizer:
    other ids would train on, or be scored as, silently scrambled text."""
    saved = manifest["files"].get("tokenizer.model", {}).get("sha256")
    return saved is None or saved == data_meta["tokenizer_sha256"]


def check_topology(step_dir: Path, manifest: dict[str, Any], tensor: int, pipeline: int) -> None:
    saved = manifest["topology"]
    if (saved["tensor"], saved["pipeline"]) != (tensor, pipeline):
        raise UserError(
            f"checkpoint {step_dir}: saved with tensor={saved['tensor']} pipeline={saved['pipeline']}, "
            f"this run uses tensor={tensor} pipeline={pipeline}; re-shard it with `sparse-lm convert reshard`"
        )


# What a resume must share with its checkpoint to continue exactly: the model and sparsity sections
# fix every tensor's shape, which entries are stored and how they are selected; the headroom fixes
# a tensor-parallel shard's slot count; the seed (and sparsity.supar, which scales it) fixes θ₀
# (regenerated complements) and data order.
# The schedule's knobs (sparsity.reselect_every, penalty, freeze_masks_after, beta, warmup_frac,
# finetune_frac) may change on resume, like the learning rate and its group multipliers: the run
# then goes on differently, by choice.
RESUME_FIELDS = ("model", "sparsity.method", "sparsity.density", "sparsity.exploration", "sparsity.granularity",
                 "sparsity.block_size", "sparsity.complement", "sparsity.targets", "sparsity.allocation",
                 "sparsity.candidates", "sparsity.supar", "parallel.shard_headroom", "train.seed")


def check_config(step_dir: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume under a config whose RESUME_FIELDS differ from the checkpoint's, naming
    the first differing field (the saved config is read with today's defaults for newer fields)."""
    from sparse_lm.config import config_from_dict

    saved = config_from_dict(manifest["config"]).to_dict()
    for field in RESUME_FIELDS:
        section, _, name = field.partition(".")
        for key in [name] if name else list(saved[section]):
            old, new = saved[section][key], config[section].get(key)
            if old != new:
                raise UserError(f"checkpoint {step_dir}: saved with {section}.{key}={old!r}, this run has {new!r}; "
                                f"resuming needs the checkpoint's value (--set {section}.{key}={old})")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"checkpoint file {path}: unreadable safetensors ({exc})") from None


class ShardFile(Mapping[str, torch.Tensor]):
    """A safetensors file read one tensor at a time, so that loading a shard into a live model
    holds one tensor beside the model rather than the whole file. Each read opens the file anew:
    safetensors maps the whole file, and the pages read through a handle that stays open stay in
    the process's resident set until it closes (a 2 GiB file read through one handle raised peak
    RSS by 2.2 GiB; opened per tensor, by the largest tensor)."""

    def __init__(self, path: Path):
        self.path = path
        with self._open() as handle:
            self._keys = list(handle.keys())
        self._known = set(self._keys)

    def _open(self):
        try:
            return safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise UserError(f"checkpoint file {self.path}: unreadable safetensors ({exc})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        with self._open() as handle:
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise UserError(f"checkpoint file {self.path}: tensor {key} unreadable ({exc})") from None

    def shape(self, key: str) -> list[int]:
        """The tensor's shape, from the header alone."""
        with self._open() as handle:
            return list(handle.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_shard(step_dir: Path, manifest: dict[str, Any], kind: str, tp_rank: int,
               pp_rank: int) -> dict[str, torch.Tensor]:
    """A verified `model` or `optim` shard file's tensors, all in memory (offline conversion,
    which merges whole layers anyway)."""
    name = shard_name(kind, tp_rank, pp_rank)
    verify_files(step_dir, manifest, [name])
    return _load_tensors(step_dir / name)


def open_shard(step_dir: Path, manifest: dict[str, Any], kind: str, tp_rank: int, pp_rank: int) -> ShardFile:
    """A verified `model` or `optim` shard file, read a tensor at a time (resume)."""
    name = shard_name(kind, tp_rank, pp_rank)
    verify_files(step_dir, manifest, [name])
    return ShardFile(step_dir / name)


@torch.no_grad()
def load_state(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """Copy canonically keyed `tensors` (a pipeline stage's own names are mapped to them) into the
    model's parameters and buffers one at a time, after checking every key and shape, so that a
    checkpoint that does not fit leaves the model untouched and fails in one line naming `source`."""
    current = model.state_dict()
    own = {canonical_name(key): key for key in current}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint file {source}: does not fit this model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key in tensors:
        shape = tensors.shape(key) if isinstance(tensors, ShardFile) else list(tensors[key].shape)
        if shape != list(current[own[key]].shape):
            raise UserError(f"checkpoint file {source}: tensor {key} has shape {shape}, this model's is "
                            f"{list(current[own[key]].shape)} (saved with another model or sparsity config)")
    for key in tensors:
        current[own[key]].copy_(tensors[key])


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, topo: Topology,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore weights, Adam state and RNG for exact resume; returns the manifest. `config` (the
    run's `RunConfig.to_dict()`) is checked against the checkpoint's first (`check_config`)."""
    step_dir = find_checkpoint(path)
    manifest = read_manifest(step_dir)
    check_topology(step_dir, manifest, topo.tensor, topo.pipeline)
    if config is not None:
        check_config(step_dir, manifest, config)
    weights = open_shard(step_dir, manifest, "model", topo.tp_rank, topo.pp_rank)
    load_state(model, weights, weights.path)
    rng_name = f"rng-rank{topo.rank:05d}.safetensors"
    moments = open_shard(step_dir, manifest, "optim", topo.tp_rank, topo.pp_rank)
    _restore_optimizer(optimizer, model, weights, moments, manifest["optimizer_step"])
    if rng_name in manifest["files"]:  # absent when resuming on more data-parallel ranks
        verify_files(step_dir, manifest, [rng_name])
        rng = _load_tensors(step_dir / rng_name)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return manifest | {"path": str(step_dir)}
