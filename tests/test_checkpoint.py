"""The checkpoint store and crash-safe writes, in process: saving on the run's device, refusing a
checkpoint of another config with one line, write failures as one line, and recovery from a crash
between the two renames of a re-published directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sparse_lm.checkpoint.store import save_checkpoint
from sparse_lm.config import ModelConfig, RunConfig, SparsityConfig
from sparse_lm.errors import UserError
from sparse_lm.model import resolve_vocab
from sparse_lm.model.build import build_model
from sparse_lm.parallel.state import Topology


def tiny_config(**sparsity) -> RunConfig:
    cfg = RunConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16),
                    sparsity=SparsityConfig(**({"method": "topkast", "density": 0.3, "exploration": 0.2} | sparsity)))
    cfg.model = resolve_vocab(cfg.model, 64)
    cfg.train.seq_len = 16
    return cfg.validate()


def topology(device: str = "cpu") -> Topology:
    return Topology(rank=0, world=1, tensor=1, pipeline=1, data=1, tp_rank=0, pp_rank=0, dp_rank=0,
                    device=torch.device(device))


def trained_step(cfg: RunConfig, device: str = "cpu"):
    """(model, AdamW) after one real step, so Adam's state exists as it does when a run saves."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len + 1), device=device)
    model(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    return model, optimizer


def save(root: Path, cfg: RunConfig, model, optimizer, step: int = 1, device: str = "cpu") -> Path:
    tokenizer = root.parent / "tokenizer.model"
    tokenizer.write_bytes(b"a tokenizer")
    return save_checkpoint(root, step, model, optimizer, topology(device), {"step": step, "samples_seen": 0,
                           "tokens_seen": 0}, cfg.to_dict(), tokenizer, keep=2)


# ---------------------------------------------------------------- the run's device
def _non_finite_body(rank, world, root):
    """Only rank 1 holds a NaN; both ranks must refuse (or neither would leave the barrier)."""
    cfg = tiny_config()
    model, optimizer = trained_step(cfg)
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    topo = Topology(rank=rank, world=world, tensor=1, pipeline=1, data=world, tp_rank=0, pp_rank=0, dp_rank=rank,
                    device=torch.device("cpu"))
    try:
        save_checkpoint(Path(root), 3, model, optimizer, topo, {}, cfg.to_dict(), Path(root) / "none", keep=1)
    except UserError as exc:
        return str(exc)
    return None


def test_non_finite_weights_on_one_rank_are_refused_on_all(tmp_path):
    from tests.distributed import run_distributed

    errors = run_distributed(_non_finite_body, 2, str(tmp_path), timeout=120)
    assert errors == ["step 3: the model holds 1 non-finite values; not saving a checkpoint"] * 2
    assert not list(tmp_path.glob("step_*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: NCCL process groups take CUDA tensors only")
def test_save_and_resume_on_a_gpu_under_nccl(tmp_path):
    """A run on a GPU has an NCCL-only process group: the save's and the load's collectives must not
    be given a CPU tensor ("No backend type associated with device type cpu"), and what is loaded
    back onto the GPU is what was saved."""
    import torch.distributed as dist

    from sparse_lm.checkpoint.store import load_checkpoint

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = tiny_config()
        model, optimizer = trained_step(cfg, "cuda")
        step_dir = save(tmp_path / "ckpt", cfg, model, optimizer, device="cuda")
        torch.manual_seed(1)
        resumed = build_model(cfg).to("cuda")
        resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
        load_checkpoint(step_dir, resumed, resumed_optimizer, topology("cuda"), cfg.to_dict())
    finally:
        dist.destroy_process_group()
    assert (step_dir / "manifest.json").is_file()
    for (name, saved), loaded in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert loaded.is_cuda and torch.equal(saved, loaded), name


# ---------------------------------------------------------------- bf16: the fp32 masters
def test_bf16_resume_keeps_the_fp32_masters(data_dir, tmp_path):
    """A bf16 run (ZeRO-1: DeepSpeed keeps fp32 masters) resumed from its step-6 checkpoint repeats
    the uninterrupted run's steps 7-12 exactly and ends with the same fp32 masters. Saving the
    model's bf16 copy instead rounded the masters to bf16 at every resume (step 8's loss moved by
    4e-4 here). It asks for `zero_stage: 0`, a GPU's default, which runs on ZeRO-1: DeepSpeed's bf16
    optimizer without ZeRO hid the masters from the checkpoint, whose first save failed. With SμPar
    and a learning rate per group, which ZeRO-1's flat partitions must keep apart."""
    from safetensors.torch import load_file

    from tests.cli_runs import STEPS, records, run_cli, write_config

    sections = {"train": {"precision": "bf16", "lr_mult_embedding": 2.0, "lr_mult_hidden": 0.3},
                "parallel": {"zero_stage": 0},
                "sparsity": {"method": "topkast", "density": 0.2, "exploration": 0.2, "reselect_every": 4,
                             "supar": True}}
    full = write_config(tmp_path, data_dir, "full", **sections)
    resumed = write_config(tmp_path, data_dir, "resumed", **sections)
    proc = run_cli("pretrain", "--config", str(full))
    assert "bf16: DeepSpeed ZeRO stage 1 (parallel.zero_stage=0)" in proc.stdout
    ckpt = tmp_path / "resumed" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000006", ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000006\n")
    run_cli("pretrain", "--config", str(resumed), "--resume")

    want = {r["step"]: r["loss"] for r in records(tmp_path / "full", "step")}
    got = {r["step"]: r["loss"] for r in records(tmp_path / "resumed", "step")}
    assert [got[step] for step in range(7, STEPS + 1)] == [want[step] for step in range(7, STEPS + 1)]
    name = f"step_{STEPS:08d}/model-tp00-pp00.safetensors"
    want, got = load_file(tmp_path / "full" / "checkpoints" / name), load_file(ckpt / name)
    assert want["layers.0.mlp.up_proj.values"].dtype == torch.float32  # the master, not the bf16 copy
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- a checkpoint of another config
def _load(step_dir: Path, cfg: RunConfig, config: dict | None = None, model=None):
    from sparse_lm.checkpoint.store import load_checkpoint

    model = build_model(cfg) if model is None else model
    return load_checkpoint(step_dir, model, torch.optim.AdamW(model.parameters()), topology(), config)


@pytest.mark.parametrize("field, value", [("sparsity.density", 0.4), ("sparsity.exploration", 0.1),
                                          ("parallel.shard_headroom", 0.5), ("train.seed", 7),
                                          ("model.d_model", 64)])
def test_resume_under_another_config_is_one_line(tmp_path, field, value):
    """A field the resume must share with the checkpoint is refused by name with both values; a
    field that may change (train.lr) is not."""
    cfg = tiny_config()
    step_dir = save(tmp_path / "ckpt", cfg, *trained_step(cfg))
    other = tiny_config()
    section, name = field.split(".")
    setattr(getattr(other, section), name, value)
    old = getattr(getattr(cfg, section), name)
    with pytest.raises(UserError) as err:
        _load(step_dir, cfg, other.to_dict())
    assert str(err.value) == (f"checkpoint {step_dir}: saved with {field}={old!r}, this run has {value!r}; "
                              f"resuming needs the checkpoint's value (--set {field}={old})")
    other = tiny_config()
    other.train.lr, other.sparsity.reselect_every, other.sparsity.penalty = 0.5, 7, 0.5  # schedule knobs
    assert _load(step_dir, cfg, other.to_dict())["step"] == 1


def test_a_tensor_of_another_shape_is_one_line(tmp_path):
    """Without the config check (its caller passes none), a size mismatch is still one line naming
    the file and tensor with both shapes, not torch's multi-line RuntimeError, and the model is
    left as it was (every shape is read from the header before any tensor is copied)."""
    cfg = tiny_config()
    step_dir = save(tmp_path / "ckpt", cfg, *trained_step(cfg))
    other = build_model(tiny_config(density=0.4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(UserError) as err:
        _load(step_dir, tiny_config(density=0.4), model=other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # shapes are checked first
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"checkpoint file {step_dir / 'model-tp00-pp00.safetensors'}: tensor layers.0.")
    assert "has shape [" in str(err.value) and "this model's is [" in str(err.value)


# ---------------------------------------------------------------- failed writes and crashes
def test_a_failed_write_leaves_the_file_and_no_temporary(tmp_path):
    """The operating system refuses the bytes (a file-size limit stands in for a full disk)."""
    import resource

    from sparse_lm.atomic import write_bytes

    path = tmp_path / "latest"
    write_bytes(path, b"step_00000006\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            write_bytes(path, b"x" * 4096)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == b"step_00000006\n" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_failed_latest_pointer_is_one_line(tmp_path):
    """Publishing and moving `latest` are part of the save: their write errors are the save's one
    line too (here the pointer's temporary name is taken by a directory)."""
    import os

    cfg = tiny_config()
    model, optimizer = trained_step(cfg)
    first = save(tmp_path / "ckpt", cfg, model, optimizer, step=1)
    (tmp_path / "ckpt" / f".latest.tmp-{os.getpid()}").mkdir()
    with pytest.raises(UserError) as err:
        save(tmp_path / "ckpt", cfg, model, optimizer, step=2)
    assert str(err.value) == (f"checkpoint.dir {tmp_path / 'ckpt'}: writing step 2 failed (Is a directory); the last "
                              "complete checkpoint (step_00000001) is untouched — free space and resume")
    assert (tmp_path / "ckpt" / "latest").read_text() == f"{first.name}\n"


def _crash_between_renames(final: Path) -> Path:
    """The state a crash inside publish_dir leaves: `final` moved aside, its replacement not yet in."""
    aside = final.with_name(f".{final.name}.old-999")
    final.rename(aside)
    return aside


def test_a_crash_while_republishing_is_recovered(tmp_path):
    """`latest` names a step whose re-save crashed between publish_dir's renames: reading it puts
    the old directory back; so does the next publish of the same name, which then replaces it."""
    from sparse_lm.atomic import publish_dir
    from sparse_lm.checkpoint.store import find_checkpoint, read_manifest

    cfg = tiny_config()
    step_dir = save(tmp_path / "ckpt", cfg, *trained_step(cfg), step=4)
    aside = _crash_between_renames(step_dir)
    assert find_checkpoint(tmp_path / "ckpt") == step_dir and read_manifest(step_dir)["step"] == 4
    assert not aside.exists()

    out = tmp_path / "out"
    (out).mkdir()
    (out / "old.txt").write_text("old")
    _crash_between_renames(out)
    new = tmp_path / ".tmp-out"
    new.mkdir()
    (new / "new.txt").write_text("new")
    publish_dir(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "tokenizer.model"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    """Should moving the new directory in fail (e.g. EXDEV, ENOSPC on a journal), the old one is
    moved back at once: `final` is never left missing by a failure publish_dir sees."""
    import os

    from sparse_lm import atomic

    final, new = tmp_path / "out", tmp_path / ".tmp-out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        atomic.publish_dir(new, final)
    assert (final / "old.txt").read_text() == "old" and not list(tmp_path.glob(".out.old-*"))


def test_a_manifest_without_a_required_field_is_one_line(tmp_path):
    import json

    from sparse_lm.checkpoint.store import read_manifest

    cfg = tiny_config()
    step_dir = save(tmp_path / "ckpt", cfg, *trained_step(cfg))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    del manifest["files"]
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        read_manifest(step_dir)
    assert str(err.value) == (f"checkpoint file {step_dir / 'manifest.json'}: no 'files' field "
                              "(expected step, optimizer_step, topology, config, state, files)")
