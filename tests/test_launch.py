"""The launch paths of docs/guide/launch.md, run for real on this machine: two "nodes" started by two
independent `deepspeed --no_ssh --node_rank 0|1` launchers, and `torchrun --nproc_per_node 2`.

Each forms a data-parallel world of 2 ranks training the tiny Top-KAST model with micro_batch 2,
and must reproduce, step for step, the losses of one process with micro_batch 4 (rank r takes the
r-th half of every batch; gradients are averaged). Launchers run in their own sessions with a
deadline; on any failure every process of the run is killed and the launcher output is shown.

DeepSpeed's CPU all-reduce puts a 66 MB `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`
segment per rank when all ranks are on one host (LOCAL_SIZE == world size, e.g. a single process)
and never unlinks it; every run here removes those of its own port afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cli_runs import REFERENCE_VARIANTS, REPO, STEPS, free_port, records, write_config

TIMEOUT_S = 300  # one launch group; a run takes ~15 s on 2 idle cores
SPARSITY = REFERENCE_VARIANTS["topkast"]["sparsity"]
# 2 ranks × micro_batch 2 = the reference's global batch of 4; 4 held-out batches of 2 are its 2 of 4.
DP2_TRAIN = {"micro_batch": 2, "eval_batches": 4}
PRETRAIN = str(REPO / "launch" / "pretrain.py")
LAUNCHERS = ("deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run")


@pytest.fixture(scope="module")
def reference(reference_runs) -> Path:
    """`python -m sparse_lm pretrain` in one process: the losses every launcher must reproduce."""
    return reference_runs("topkast")


def _env(port: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=port,
               PYTHONFAULTHANDLER="1")  # a SIGABRT makes a rank print its Python stacks
    return env


def _unlink_shm(port: str) -> None:
    """Remove DeepSpeed's leaked all-reduce segments of this run (all its processes are gone)."""
    for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        segment.unlink(missing_ok=True)


def _processes_of(marker: str) -> list[psutil.Process]:
    """Live processes of this run: every launcher and rank has the run's unique config path in its
    command line (torchrun starts its workers in new sessions, so a process group is not enough)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _dump_stacks(marker: str) -> None:
    """SIGABRT every rank of the run: faulthandler prints where each one is stuck into the log."""
    ranks = [p for p in _processes_of(marker) if not set(LAUNCHERS) & set(p.info["cmdline"] or ())]
    for p in ranks:
        try:
            p.send_signal(signal.SIGABRT)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(ranks, timeout=5)


def _kill(procs: list[subprocess.Popen], marker: str) -> list[str]:
    """SIGKILL each launcher's process group and any stray process of the run; name the strays."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: itself and its ranks
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
    strays = _processes_of(marker)
    for p in strays:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(strays, timeout=30)
    return [f"{p.pid}" for p in strays]


def _build_locks() -> list[str]:
    """Torch-extension build locks: a stale one (left by a process killed while loading DeepSpeed's
    `deepspeed_shm_comm` op) makes every later rank wait for it forever."""
    roots = [os.environ.get("TORCH_EXTENSIONS_DIR", ""), str(Path.home() / ".cache" / "torch_extensions")]
    found = []
    for lock in sorted({lock for root in roots if root and Path(root).is_dir() for lock in Path(root).glob("**/lock")}):
        try:
            found.append(f"{lock} (age {time.time() - lock.stat().st_mtime:.0f} s)")
        except FileNotFoundError:  # released meanwhile
            pass
    return found


def launch_all(commands: list[list[str]], marker: str, logs: Path, port: str, timeout: float = TIMEOUT_S) -> None:
    """Run the commands concurrently (one launcher each) from the repository root, with rendezvous
    port `port`; fail with their output unless all exit 0 before the deadline and leave no process
    behind. `marker` is a string in the command line of every process of the run."""
    procs: list[subprocess.Popen] = []
    paths = [logs / f"launcher{i}.log" for i in range(len(commands))]
    problem = ""
    start = time.monotonic()
    try:
        for cmd, path in zip(commands, paths):
            with open(path, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(port), stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        while any([p.poll() is None for p in procs]):  # a list: poll every launcher each time
            if any(p.returncode not in (None, 0) for p in procs):
                problem = "a launcher failed; killed the others"  # its peers would wait on collectives
                break
            if time.monotonic() - start > timeout:
                problem = f"timed out after {timeout:.0f} s (Python stacks of the ranks below); killed all"
                _dump_stacks(marker)
                break
            time.sleep(0.2)
    finally:
        codes = [p.poll() for p in procs]
        strays = _kill(procs, marker)
        _unlink_shm(port)
    if strays and not problem:
        problem = f"processes left behind (killed): {', '.join(strays)}"
    if problem or any(c != 0 for c in codes):
        report = [f"{problem or 'a launcher failed'}; exit codes {codes}"]
        report += [f"torch extension build lock present: {lock}" for lock in _build_locks()]
        for cmd, path in zip(commands, paths):
            report += [f"--- {' '.join(cmd)}", path.read_text()[-6000:] if path.exists() else "(no output)"]
        pytest.fail("\n".join(report), pytrace=False)


def assert_matches_reference(run: Path, reference: Path) -> None:
    ref = {r["step"]: r["loss"] for r in records(reference, "step")}
    got = records(run, "step")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r in got:  # fp32 sums in a different order: equal to rounding, drifting slowly with steps
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-4), r["step"]
    ref_heldout = [(r["step"], r["loss"]) for r in records(reference, "heldout")]
    heldout = records(run, "heldout")  # the same held-out windows, split over the two ranks
    assert [r["step"] for r in heldout] == [s for s, _ in ref_heldout]
    for r, (_, loss) in zip(heldout, ref_heldout):
        assert r["loss"] == pytest.approx(loss, rel=1e-4), r["step"]
    assert [r["step"] for r in records(run, "reselect")] == [4, 8]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((run / "checkpoints" / latest / "manifest.json").read_text())
    assert manifest["step"] == STEPS and manifest["topology"]["data"] == 2


def test_two_nodes_without_ssh_match_one_process(reference, data_dir, tmp_path):
    """Two `deepspeed --no_ssh` launchers, one per simulated node (node_rank 0 and 1, one rank
    each, meeting at 127.0.0.1), as a Slurm or Kubernetes job runs them: one data-parallel world."""
    config = write_config(tmp_path, data_dir, "nodes", sparsity=SPARSITY, train=DP2_TRAIN)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")  # names are labels under --no_ssh
    port = free_port()
    commands = [
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         "--num_nodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
         PRETRAIN, "--config", str(config)]
        for rank in (0, 1)
    ]
    launch_all(commands, str(config), tmp_path, port)
    assert_matches_reference(tmp_path / "nodes", reference)


def test_torchrun_two_processes_match_one_process(reference, data_dir, tmp_path):
    config = write_config(tmp_path, data_dir, "torchrun", sparsity=SPARSITY, train=DP2_TRAIN)
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               PRETRAIN, "--config", str(config)]
    launch_all([command], str(config), tmp_path, port)
    assert_matches_reference(tmp_path / "torchrun", reference)


def test_example_hostfile_is_what_deepspeed_reads():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(REPO / "launch" / "hostfile.example"))) == {"node1": 8, "node2": 8}
