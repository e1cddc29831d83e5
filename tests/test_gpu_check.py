"""The GPU check's own logic, on the CPU: the wheel check finds a missing, misplaced or doubled
wheel (on small wheels made here, no download), and the step runner goes on past a failing, a
stalled or a broken step, rewrites summary.json after each, reports CUDA steps as skipped once
their command check passes, and exits 1 when any step failed."""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cli_runs import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

PY = sys.executable
# What the prepared folder holds (tools/prepare_gpu_wheels.sh), each wheel's requirements as its own.
WHEELS = {
    "deepspeed-0.19.8-py3-none-any.whl": ["hjson", "pydantic>=2.0.0", "torch>=2.0.0", "numpy"],
    "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl": ["torch>=2.6.0", "packaging>=24.2"],
    "datasets-5.2.0-py3-none-any.whl": ["dill<0.4.2,>=0.3.0", "pyarrow>=24.0.0", "huggingface-hub<3.0,>=1.31.0",
                                        "pytest; extra == 'tests'", "winreg-helper; sys_platform == 'win32'"],
    "dill-0.4.1-py3-none-any.whl": [],
    "hjson-3.1.0-py3-none-any.whl": [],
    "pydantic-2.14.4-py3-none-any.whl": ["typing-extensions>=4.16.0"],
    "typing_extensions-4.16.0-py3-none-any.whl": [],
}


def _wheel(folder: Path, filename: str, requires: list[str]) -> None:
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(folder / filename, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\nName: "
                         f"{name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


@pytest.fixture
def wheels(tmp_path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for filename, requires in WHEELS.items():
        _wheel(folder, filename, requires)
    return folder


def test_the_prepared_set_is_complete_for_the_image(wheels):
    assert gpu_wheels.problems(wheels) == []


def test_a_missing_wheel_is_named(wheels):
    (wheels / "hjson-3.1.0-py3-none-any.whl").unlink()
    (wheels / "deepspeed-0.19.8-py3-none-any.whl").rename(wheels / "deepspeed-0.19.8.tar.gz")
    errors = gpu_wheels.problems(wheels)
    assert "deepspeed: no wheel of it, and the image lacks it" in errors
    assert not any("hjson" in e for e in errors)  # nothing requires it once deepspeed is gone
    _wheel(wheels, "deepspeed-0.19.8-py3-none-any.whl", WHEELS["deepspeed-0.19.8-py3-none-any.whl"])
    assert gpu_wheels.problems(wheels) == ["deepspeed-0.19.8-py3-none-any.whl: requires hjson, which neither "
                                           "the image nor a wheel holds"]


def test_a_wheel_for_another_python_a_second_version_and_the_size_limit(wheels, monkeypatch):
    _wheel(wheels, "megatron_core-0.16.0-cp311-cp311-manylinux_2_28_x86_64.whl", [])
    errors = gpu_wheels.problems(wheels)
    assert any("a second wheel of megatron-core" in e for e in errors)
    assert any(e.startswith("megatron_core-0.16.0-cp311") and "not installable" in e for e in errors)
    monkeypatch.setattr(gpu_wheels, "MAX_BYTES", 100)
    assert any("over the 0 MiB limit" in e for e in gpu_wheels.problems(wheels))


def test_a_requirement_the_images_version_misses_needs_a_wheel(wheels):
    image = {**gpu_wheels.image_packages(), "huggingface-hub": "1.20.0"}
    assert any("huggingface-hub<3.0,>=1.31.0, the image holds huggingface-hub==1.20.0" in e
               for e in gpu_wheels.problems(wheels, image))


def test_the_rehearsal_installs_only_what_the_image_holds():
    script = (REPO / "tools" / "gpu_check.sh").read_text()
    pins = dict(item.partition("==")[::2] for item in re.search(r"^image=\((.*?)\)", script, re.M | re.S)
                .group(1).split())
    image = gpu_wheels.image_packages()
    assert pins and set(pins) <= set(image)
    assert all(version == image[name] for name, version in pins.items() if version)
    assert {name for name, version in pins.items() if image[name] and not version} == {"numpy"}  # none for 3.11


def test_every_cuda_step_has_a_command_check():
    assert all(step.rehearse for step in gpu_check.steps() if step.cuda)


def _run(monkeypatch, tmp_path, steps, *args, install="ran"):
    monkeypatch.setattr(gpu_check, "steps", lambda: steps)
    monkeypatch.setattr(gpu_check, "install_step", lambda check, wheels, links: lambda t: (install, "", {}))
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (False, "cpu"))
    code = gpu_check.main(["--rehearse", "--out", str(tmp_path / "out"), *args])
    return code, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_every_step_runs_whatever_failed_before_it(monkeypatch, tmp_path):
    steps = [gpu_check.Step("broken", 30, [PY, "tools/no_such_tool.py"]),
             gpu_check.Step("stalls", 1, [PY, "-c", "import time; print('waiting', flush=True); time.sleep(30)"]),
             gpu_check.Step("cpu", 30, [PY, "-c", "print('fine')"]),
             gpu_check.Step("gpu", 30, [PY, "-c", "raise SystemExit(9)"], cuda=True, rehearse=[PY, "-c", "pass"])]
    code, summary = _run(monkeypatch, tmp_path, steps)
    assert code == 1 and summary["finished"] and summary["mode"] == "rehearsal"
    got = {r["name"]: r for r in summary["steps"]}
    assert [r["name"] for r in summary["steps"]] == ["install", "broken", "stalls", "cpu", "gpu"]
    assert got["broken"]["status"] == "failed" and "no_such_tool.py" in got["broken"]["reason"]
    assert got["stalls"]["status"] == "failed" and got["stalls"]["reason"].startswith("timed out after 1 s")
    assert got["cpu"]["status"] == "ran" and got["gpu"]["status"] == "skipped"
    assert got["gpu"]["reason"] == "needs CUDA; its command check passed"
    assert all(isinstance(r["seconds"], float | int) for r in summary["steps"])
    assert "fine" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_broken_command_of_a_cuda_step_fails_the_rehearsal(monkeypatch, tmp_path):
    steps = [gpu_check.Step("gpu", 30, [PY, "-c", "pass"], cuda=True,
                            rehearse=[PY, "-m", "pytest", "--collect-only", "-q", "tests/no_such_test.py"])]
    code, summary = _run(monkeypatch, tmp_path, steps)
    assert code == 1 and summary["steps"][1]["status"] == "failed"
    assert summary["steps"][1]["reason"].startswith("command check exited 4")


def test_a_failed_install_fails_the_check_and_the_rest_still_runs(monkeypatch, tmp_path):
    code, summary = _run(monkeypatch, tmp_path, [gpu_check.Step("cpu", 30, [PY, "-c", "pass"])], install="failed")
    assert code == 1 and [r["status"] for r in summary["steps"]] == ["failed", "ran"]


def test_the_install_step_names_a_missing_wheel(wheels, tmp_path):
    (wheels / "dill-0.4.1-py3-none-any.whl").unlink()
    (tmp_path / "out").mkdir()
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", rehearse=True, budget=60)
    status, reason, numbers = gpu_check.install_step(check, wheels, [])(60)
    assert status == "failed" and "requires dill<0.4.2,>=0.3.0, which neither the image nor a wheel holds" in reason
    assert numbers["wheel_mib"] < 1


def test_past_the_budget_steps_are_skipped_not_lost(monkeypatch, tmp_path):
    steps = [gpu_check.Step("late", 30, [PY, "-c", "pass"])]
    code, summary = _run(monkeypatch, tmp_path, steps, "--budget", "0")
    assert code == 0 and summary["steps"][-1] == {"name": "late", "status": "skipped", "seconds": 0,
                                                  "reason": "the check's time budget is spent"}


def test_an_unknown_step_is_one_line(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "kernel"])
    assert "--only kernel: expected steps among" in capsys.readouterr().err
