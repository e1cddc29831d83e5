"""Crash safety and bad-step handling of real training processes: SIGKILL at a step and in the
middle of a save, then `--resume`; injected non-finite losses; standalone checkpoint verification.

Faults are caused through `SPARSE_LM_FAULTS` (sparse_lm/faults.py) or a real SIGKILL from
the test; every run is a subprocess of the CLI on the tiny model of tests/cli_runs.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from sparse_lm.termination import SigtermGuard, Terminated
from tests.cli_runs import REFERENCE_VARIANTS, REPO, STEPS, free_port, records, run_cli, write_config

SPARSE = REFERENCE_VARIANTS["topkast"]


@pytest.fixture(scope="module")
def reference(reference_runs):
    """The uninterrupted Top-KAST run's loss at every step: what a resumed run must reproduce (the
    checkpoint writer is the same for dense parameters; test_train resumes a dense run too)."""
    return {r["step"]: r["loss"] for r in records(reference_runs("topkast"), "step")}


def _losses_after_resume(run_dir):
    """Each step's loss; a resumed run keeps one record per step in metrics.jsonl."""
    steps = records(run_dir, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return {r["step"]: r["loss"] for r in steps}


def test_killed_mid_save_resumes_exactly(reference, data_dir, tmp_path):
    """SIGKILL while step 12 is being written: step 6 stays the loadable latest checkpoint and the
    resumed run's steps 7-12 equal the uninterrupted run's."""
    config = write_config(tmp_path, data_dir, "run", **SPARSE)
    env = {"SPARSE_LM_FAULTS": f"kill_in_save@{STEPS}"}
    proc = run_cli("pretrain", "--config", str(config), check=False, env=env)
    assert proc.returncode != 0
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert not (ckpt / f"step_{STEPS:08d}").exists()
    run_cli("checkpoint", "verify", str(ckpt))
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [r["step"] for r in records(tmp_path / "run", "heldout")] == [6, 12]
    with open(metrics, "a") as handle:  # as if killed in the middle of writing a record
        handle.write('{"kind": "step", "st')
    proc = run_cli("pretrain", "--config", str(config), "--resume")
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in records(tmp_path / "run", "heldout")] == [6, 12]  # 12 from the resumed run
    assert [r["step"] for r in records(tmp_path / "run", "resume")] == [6]
    losses = _losses_after_resume(tmp_path / "run")
    for step in range(7, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step
    assert not list(ckpt.glob(".tmp-*"))  # the half-written save was cleaned up by the next one
    summary = records(tmp_path / "run", "summary")[-1]  # the training time of both processes adds up
    before = json.loads((ckpt / "step_00000006" / "manifest.json").read_text())["state"]["train_seconds"]
    assert before > 0 and summary["train_wall_s"] == pytest.approx(before + summary["wall_s"], abs=0.5)


def test_disk_full_during_save_is_one_line_and_loses_nothing(reference, data_dir, tmp_path):
    """Writing step 12 fails with ENOSPC (injected after its model shard is on disk): one line, the
    partial step removed, step 6 still `latest` and verified; after freeing space, resume is exact."""
    config = write_config(tmp_path, data_dir, "run", **SPARSE)
    proc = run_cli("pretrain", "--config", str(config), check=False,
                   env={"SPARSE_LM_FAULTS": f"disk_full_in_save@{STEPS}"})
    _assert_failed_save_lost_nothing(proc, "No space left on device", config, tmp_path / "run", reference)


def test_a_real_write_failure_during_save_loses_nothing(reference, data_dir, tmp_path):
    """No injection: the operating system refuses the write. A run killed while saving step 12
    resumes from step 6 under `ulimit -f 700` (files up to 700 KiB: the model shard fits, the
    optimizer shard does not), so writing step 12 fails with EFBIG — one line, the partial step
    removed, step 6 still `latest`; without the limit, the resumed run is exact."""
    config = write_config(tmp_path, data_dir, "run", **SPARSE)
    run_cli("pretrain", "--config", str(config), check=False, env={"SPARSE_LM_FAULTS": f"kill_in_save@{STEPS}"})
    ckpt = tmp_path / "run" / "checkpoints"
    sizes = {p.name: p.stat().st_size for p in (ckpt / "step_00000006").glob("*.safetensors")}
    assert sizes["model-tp00-pp00.safetensors"] < 700 * 1024 < sizes["optim-tp00-pp00.safetensors"], sizes
    limited = ["bash", "-c", 'ulimit -f 700 && exec "$@"', "limited", sys.executable, "-m", "sparse_lm"]
    proc = run_cli("pretrain", "--config", str(config), "--resume", check=False, launcher=limited)
    _assert_failed_save_lost_nothing(proc, "File too large", config, tmp_path / "run", reference)


def _assert_failed_save_lost_nothing(proc, reason: str, config, run_dir, reference) -> None:
    """Saving step 12 failed: one line naming `reason`, the partial step removed, step 6 still the
    verified `latest`; a resume then reproduces the uninterrupted run's steps 7-12."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and reason in errors[0] and "step_00000006) is untouched" in errors[0], errors
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert not (ckpt / f"step_{STEPS:08d}").exists() and not list(ckpt.glob(".tmp-*"))
    run_cli("checkpoint", "verify", str(ckpt))
    run_cli("pretrain", "--config", str(config), "--resume")
    losses = _losses_after_resume(run_dir)
    for step in range(7, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


KILL_SEED = 19


def test_sigkill_at_a_random_step_resumes_exactly(reference, data_dir, tmp_path):
    """A real SIGKILL from outside, as soon as a step drawn at random (seeded, printed) among 7-10 is
    logged — after the step-6 checkpoint, well before the end. The process must have died by that
    signal with step 6 its last checkpoint (a run that finished first would prove nothing); the
    resumed run then reproduces every step of the uninterrupted one."""
    kill_after = random.Random(KILL_SEED).randint(7, STEPS - 2)
    print(f"SIGKILL once step {kill_after} is logged (random.Random({KILL_SEED}))")
    config = write_config(tmp_path, data_dir, "run", **SPARSE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=free_port())
    proc = subprocess.Popen([sys.executable, "-m", "sparse_lm", "pretrain", "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _has_step(metrics, kill_after):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    logged = max(step for step in range(1, STEPS + 1) if _has_step(metrics, step))
    assert kill_after <= logged < STEPS, logged
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    run_cli("pretrain", "--config", str(config), "--resume")
    losses = _losses_after_resume(tmp_path / "run")
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


def test_non_finite_steps_are_skipped(data_dir, tmp_path):
    """NaN losses at steps 3-4: both updates are skipped (weights, Adam state untouched), the run
    finishes with finite losses."""
    config = write_config(tmp_path, data_dir, "run", **SPARSE)
    run_cli("pretrain", "--config", str(config), env={"SPARSE_LM_FAULTS": "nan_loss@3-4"})
    steps = {r["step"]: r for r in records(tmp_path / "run", "step")}
    assert [s for s, r in steps.items() if r["skipped"]] == [3, 4]
    assert [steps[s]["loss"] for s in (3, 4)] == [None, None]  # NaN is not JSON: written as null
    assert all(r["loss"] == r["loss"] for s, r in steps.items() if s not in (3, 4))  # not NaN
    # a skipped update does not count as an Adam step: 6 steps, 4 updates by the step-6 checkpoint
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert manifest["optimizer_step"] == 4
    run_cli("checkpoint", "verify", str(tmp_path / "run" / "checkpoints"))


def test_too_many_bad_steps_stop_the_run_keeping_the_last_good_checkpoint(data_dir, tmp_path):
    config = write_config(tmp_path, data_dir, "run", train={"max_bad_steps": 3})
    proc = run_cli("pretrain", "--config", str(config), check=False, env={"SPARSE_LM_FAULTS": "nan_loss@7-12"})
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "3 consecutive steps with non-finite" in error[0] and "step_00000006" in error[0]
    assert [r["step"] for r in records(tmp_path / "run", "step")][-1] == 9
    run_cli("checkpoint", "verify", str(tmp_path / "run" / "checkpoints"))


def test_checkpoint_verify_names_the_bad_file(reference, data_dir, tmp_path):
    config = write_config(tmp_path, data_dir, "run", train={"steps": 6})
    run_cli("pretrain", "--config", str(config))
    step = tmp_path / "run" / "checkpoints" / "step_00000006"
    ok = run_cli("checkpoint", "verify", str(step))
    assert ok.stdout.startswith("ok:") and "step 6" in ok.stdout
    optim = step / "optim-tp00-pp00.safetensors"
    optim.write_bytes(optim.read_bytes()[:-8])
    bad = run_cli("checkpoint", "verify", str(step), check=False)
    assert bad.returncode == 2 and str(optim) in bad.stderr and "truncated" in bad.stderr


@pytest.mark.parametrize("fault", ["kill_rank1@3", "stall_rank1@3"])
def test_a_dead_or_stalled_rank_stops_the_others_with_one_line(data_dir, tmp_path, fault):
    """Two ranks started by hand (no launcher to clean up after them): when rank 1 dies or stops
    responding, rank 0 exits with one clear line within parallel.timeout_s instead of hanging."""
    config = write_config(tmp_path, data_dir, "run", parallel={"timeout_s": 15}, train={"micro_batch": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), WORLD_SIZE="2",
               SPARSE_LM_FAULTS=fault)
    cmd = [sys.executable, "-m", "sparse_lm", "pretrain", "--config", str(config)]
    ranks = [subprocess.Popen(cmd, cwd=REPO, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        started = time.time()
        _, stderr = ranks[0].communicate(timeout=240)
        elapsed = time.time() - started
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 2, stderr[-3000:]
    error = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "a collective failed" in error[0] and "--resume" in error[0]
    assert elapsed < 200


def test_sigterm_is_one_line_and_keeps_the_checkpoints(data_dir, tmp_path):
    """SIGTERM (what the deepspeed launcher sends every surviving rank when one fails, and what a
    scheduler sends on cancel) stops training with one line naming it and --resume; the checkpoint
    written before it stays the verified latest."""
    config = write_config(tmp_path, data_dir, "run", **SPARSE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=free_port(), SPARSE_LM_FAULTS="stall_rank0@8")
    proc = subprocess.Popen([sys.executable, "-m", "sparse_lm", "pretrain", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _has_step(metrics, 7):
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # stalled at step 8, after the step-6 checkpoint
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    error = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "stopped by SIGTERM" in error[0] and "--resume" in error[0], stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    run_cli("checkpoint", "verify", str(ckpt))


def test_sigterm_guard_raises_once_and_never_while_a_failure_is_reported():
    """The first SIGTERM raises `Terminated`; a second, or one after `quiet()` (the process is
    printing a failure), must not interrupt: the deepspeed launcher's SIGTERM often lands while a
    rank reports its dead peer, and once cut that report off (the killed-rank test flaked)."""
    with SigtermGuard() as guard:
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs within microseconds; the sleep only bounds a failure
        os.kill(os.getpid(), signal.SIGTERM)  # already fired: ignored
    with SigtermGuard() as guard:
        guard.quiet()
        os.kill(os.getpid(), signal.SIGTERM)  # reporting: ignored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def _has_step(metrics, step: int) -> bool:
    """Whether a running job's metrics already hold `step` (a last line still being written is
    not yet there)."""
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record["kind"] == "step" and record["step"] == step:
            return True
    return False


def test_a_rank_that_never_joins_is_one_line(data_dir, tmp_path):
    """Rank 0 of a world of 2 whose peer never starts: one line after parallel.timeout_s."""
    config = write_config(tmp_path, data_dir, "run", parallel={"timeout_s": 10})
    proc = run_cli("pretrain", "--config", str(config), check=False,
                   env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "could not form the process group with 2 ranks" in errors[0]
    assert "parallel.timeout_s=10" in errors[0]
