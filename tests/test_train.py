"""End to end through the real CLI: pretrain (DeepSpeed engine), checkpoints, exact resume, eval.

Each run is a subprocess (`python -m sparse_lm ...`), as a user runs it, on a tiny model and a
small slice of the stdlib corpus, so the whole file takes about a minute on two cores.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli_runs import REFERENCE_VARIANTS, REPO, STEPS, free_port, records, run_cli, write_config


@pytest.fixture(scope="module")
def trained(reference_runs) -> Path:
    return reference_runs("dense")


def test_training_lowers_loss_and_logs_every_step(trained):
    steps = records(trained, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    first, last = steps[0]["loss"], np.mean([r["loss"] for r in steps[-3:]])
    assert first > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert last < first - 0.5, (first, last)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    assert steps[0]["lr"] == pytest.approx(0.5e-2) and steps[1]["lr"] == pytest.approx(1e-2)
    heldout = records(trained, "heldout")
    assert [r["step"] for r in heldout] == [6, 12]
    # what it learned carries to unseen text (12 steps only reach the unigram plateau, where the
    # held-out loss between two evaluations moves by noise)
    assert all(r["loss"] < math.log(512) - 0.4 for r in heldout), heldout
    throughput = records(trained, "throughput")
    assert throughput and all(r["tokens_per_s"] > 0 for r in throughput)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["heldout_loss"] == pytest.approx(heldout[-1]["loss"])
    ckpt = trained / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000012"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000006", "step_00000012"]
    assert not list(ckpt.glob(".tmp*"))


def _resume_dir(trained: Path, tmp: Path, name: str) -> Path:
    """A fresh run directory whose checkpoint root holds only the reference's step-6 checkpoint."""
    ckpt = tmp / name / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(trained / "checkpoints" / "step_00000006", ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000006\n")
    return ckpt / "step_00000006"


@pytest.mark.parametrize("variant", sorted(REFERENCE_VARIANTS))
def test_resume_reproduces_the_uninterrupted_run_exactly(reference_runs, variant, data_dir, tmp_path):
    """Weights (sparse values, indices, masks, offload store), Adam moments, data order and LR
    schedule all come back: the resumed steps have the reference's losses."""
    trained = reference_runs(variant)
    _resume_dir(trained, tmp_path, "resumed")
    config = write_config(tmp_path, data_dir, "resumed", **REFERENCE_VARIANTS[variant])
    proc = run_cli("pretrain", "--config", str(config), "--resume")
    assert "resumed from" in proc.stdout
    ref = {r["step"]: r for r in records(trained, "step")}
    got = records(tmp_path / "resumed", "step")
    assert [r["step"] for r in got] == list(range(7, STEPS + 1))
    for r in got:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-6, abs=1e-6), r["step"]
        assert r["lr"] == ref[r["step"]]["lr"]
    final = records(tmp_path / "resumed", "heldout")[-1]["loss"]
    assert final == pytest.approx(records(trained, "heldout")[-1]["loss"], rel=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoint_is_refused_with_one_line(trained, data_dir, tmp_path, damage):
    step = _resume_dir(trained, tmp_path, "damaged")
    target = step / "model-tp00-pp00.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "delete":
        target.unlink()
    else:
        target = step / "manifest.json"
        target.write_text(target.read_text()[:50])
    config = write_config(tmp_path, data_dir, "damaged")
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and str(target) in error[0], proc.stderr[-3000:]


def test_resume_never_refuses_to_overwrite(trained, data_dir, tmp_path):
    _resume_dir(trained, tmp_path, "keep")
    config = write_config(tmp_path, data_dir, "keep", checkpoint={"resume": "never"})
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2 and "checkpoint.resume=never" in proc.stderr
    assert (tmp_path / "keep" / "checkpoints" / "step_00000006" / "manifest.json").is_file()


def test_resume_under_another_sparsity_config_is_refused_by_name(reference_runs, data_dir, tmp_path):
    """The loop hands its config to the checkpoint check: another density is one line, by name."""
    step = _resume_dir(reference_runs("topkast"), tmp_path, "denser")
    sections = json.loads(json.dumps(REFERENCE_VARIANTS["topkast"]))
    sections["sparsity"]["density"] = 0.3
    config = write_config(tmp_path, data_dir, "denser", **sections)
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"checkpoint {step}: saved with sparsity.density=0.2, this run has 0.3; resuming needs the "
            "checkpoint's value (--set sparsity.density=0.2)") in proc.stderr


def test_resume_must_without_a_checkpoint_names_the_setting(data_dir, tmp_path):
    """`checkpoint.resume: must` from the YAML (no --resume on the command line) is named as such."""
    config = write_config(tmp_path, data_dir, "run", checkpoint={"resume": "must"})
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"checkpoint.dir {tmp_path / 'run' / 'checkpoints'}: checkpoint.resume=must (or --resume) "
            "but no checkpoint") in proc.stderr


@pytest.mark.parametrize("variant", ["dense", "topkast"])
def test_eval_matches_a_direct_computation(reference_runs, variant, tmp_path):
    """`sparse-lm eval` with stride = context scores disjoint windows: recompute that by hand."""
    trained = reference_runs(variant)
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.data.packed import PackedSplit

    out = tmp_path / "eval.json"
    run_cli("eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", "heldout",
            "--context", "32", "--stride", "32", "--json", str(out))
    result = json.loads(out.read_text())
    model, cfg, _ = load_trained_model(trained / "checkpoints")
    ids = torch.from_numpy(np.asarray(PackedSplit(Path(cfg.data.path), "heldout").tokens, dtype=np.int64))
    nats, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 32):
            window = ids[begin : begin + 33]
            logits = model(window[None, :-1])
            nats += float(torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="sum"))
            count += len(window) - 1
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert result["step"] == STEPS


def test_eval_on_a_text_file_and_bad_corpus(trained, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "eval.json"
    proc = run_cli("eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", str(text), "--json", str(out))
    result = json.loads(out.read_text())
    assert result["bytes"] == len(text.read_bytes()) and math.isfinite(result["perplexity"])
    assert "perplexity" in proc.stdout
    word = tmp_path / "word.txt"  # one "word" of thousands of nats: word perplexity inf, written as null
    word.write_text("".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(300)))
    run_cli("eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", str(word), "--json", str(out))
    result = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert result["words"] == 1 and result["word_perplexity"] is None and math.isfinite(result["perplexity"])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    proc = run_cli("eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", str(empty), check=False)
    assert proc.returncode == 2 and str(empty) in proc.stderr


def test_eval_device_option(trained, tmp_path):
    """`--device cpu` scores on the CPU; a device that is not cpu/cuda[:N], or not on this machine,
    is one line naming --device."""
    from sparse_lm.errors import UserError
    from sparse_lm.eval.cli import eval_device

    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    base = ["eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", str(text)]
    run_cli(*base, "--device", "cpu", "--json", str(tmp_path / "cpu.json"))
    assert math.isfinite(json.loads((tmp_path / "cpu.json").read_text())["perplexity"])
    proc = run_cli(*base, "--device", "gpu0", check=False)
    assert proc.returncode == 2 and "--device gpu0: expected cpu, cuda" in proc.stderr, proc.stderr[-2000:]
    assert len([x for x in proc.stderr.splitlines() if "error:" in x]) == 1
    for bad, says in (("meta", "expected cpu, cuda"), ("cuda:999", "no such device")):
        with pytest.raises(UserError, match=f"^--device {bad}: {says}"):
            eval_device(bad)


def test_eval_text_field(trained, tmp_path):
    """`--text-field` picks the .jsonl field, as the error for a missing one says."""
    corpus = tmp_path / "docs.jsonl"
    docs = ["def add(a, b):\n    return a + b\n" * 10, "x = [1, 2, 3]\nprint(sum(x))\n" * 10]
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    base = ["eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", str(corpus)]
    proc = run_cli(*base, check=False)
    assert proc.returncode == 2 and "no string field 'text'" in proc.stderr and "--text-field" in proc.stderr
    run_cli(*base, "--text-field", "body", "--json", str(tmp_path / "eval.json"))
    assert json.loads((tmp_path / "eval.json").read_text())["bytes"] == sum(len(d.encode()) for d in docs)


def test_eval_window_options_are_checked_each_by_its_name(trained, tmp_path):
    """0 is not taken as "the default", and each bad value is blamed on its own option."""
    from sparse_lm.errors import UserError
    from sparse_lm.eval.cli import evaluate

    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    ckpt, corpus = str(trained / "checkpoints"), [str(text)]
    for context, stride, batch, says in ((0, None, 8, "--context 0: expected an integer >= 1"),
                                         (-5, None, 8, "--context -5: expected an integer >= 1"),
                                         (16, 0, 8, "--stride 0: expected an integer >= 1"),
                                         (16, 17, 8, "--stride 17: expected 1..16"),
                                         (64, None, 8, "--context 64: longer than the model's context"),
                                         (16, 8, 0, "--batch-size 0: expected an integer >= 1"),
                                         (16, 8, -1, "--batch-size -1: expected an integer >= 1")):
        with pytest.raises(UserError, match=f"^{says}"):
            evaluate(ckpt, corpus, context, stride, batch, None, progress=False)
    assert evaluate(ckpt, corpus, 1, 1, 3, None, progress=False)["context"] == 1


def test_throughput_leaves_out_heldout_eval_and_checkpoints(data_dir, tmp_path):
    """With an evaluation and a checkpoint after every step, a log window's step time is the time
    from each step's start (the previous step's checkpoint record) to its step record, not more."""
    config = write_config(tmp_path, data_dir, "run", train={"eval_every": 1}, checkpoint={"every": 1, "keep": 1})
    run_cli("pretrain", "--config", str(config))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = {r["step"] + 1: r["time"] for r in lines if r["kind"] == "checkpoint"}
    training = {r["step"]: r["time"] - start[r["step"]] for r in lines if r["kind"] == "step" and r["step"] in start}
    paused = [b["time"] - a["time"] for a, b in zip(lines, lines[1:]) if b["kind"] == "checkpoint"]
    assert sum(paused) / len(paused) > 0.01  # evaluating and saving take long enough to show
    for r in records(tmp_path / "run", "throughput")[1:]:  # the first window has no step-0 checkpoint
        window = [training[s] for s in range(r["step"] - 3, r["step"] + 1)]
        assert r["step_time_s"] == pytest.approx(sum(window) / 4, rel=0.2, abs=0.005), (r, window)


def test_topkast_run_reselects_and_stays_sparse(reference_runs):
    run = reference_runs("topkast")
    reselections = records(run, "reselect")
    assert [r["step"] for r in reselections] == [4, 8]
    assert all(0 < r["changed_b"] <= 1 and 0 <= r["changed_a"] <= 1 for r in reselections)
    assert all(0 <= r["a_from_outside"] <= r["changed_a"] for r in reselections)
    steps = records(run, "step")
    assert np.mean([r["loss"] for r in steps[-3:]]) < steps[0]["loss"] - 0.3
    from safetensors import safe_open

    with safe_open(run / "checkpoints" / "step_00000012" / "model-tp00-pp00.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    q = "layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in shapes and shapes[f"{q}.values"][0] == shapes[f"{q}.index"][0]
    assert shapes[f"{q}.values"][0] == math.ceil(0.4 * 64 * 64)  # |B| = (D + M) · N of the 64×64 q_proj


def test_topkast_under_zero1_data_parallel_matches_one_process(reference_runs, data_dir, tmp_path):
    """Top-KAST with ZeRO-1 on 2 data-parallel ranks (`deepspeed` launcher): Adam state is
    partitioned, reselection rewrites slots through DeepSpeed's master weights and zeroes moments
    through its partitions, yet every step's loss equals the single-process run's. Then a resume
    from the ZeRO-1 run's step-6 checkpoint reproduces its steps 7-12."""
    sections = json.loads(json.dumps(REFERENCE_VARIANTS["topkast"]))
    sections["train"] = {"micro_batch": 2}
    sections["parallel"] = {"zero_stage": 1}
    config = write_config(tmp_path, data_dir, "zero1", **sections)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()]
    run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config), launcher=launcher)
    ref = {r["step"]: r["loss"] for r in records(reference_runs("topkast"), "step")}
    zero1 = tmp_path / "zero1"
    got = records(zero1, "step")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r in got:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-4), r["step"]
    assert [r["step"] for r in records(zero1, "reselect")] == [4, 8]

    _resume_dir(zero1, tmp_path, "zero1-resumed")
    config = write_config(tmp_path, data_dir, "zero1-resumed", **sections)
    run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config),
            launcher=launcher[:-1] + [free_port()])
    full = {r["step"]: r["loss"] for r in got}
    resumed = records(tmp_path / "zero1-resumed", "step")
    assert [r["step"] for r in resumed] == list(range(7, STEPS + 1))
    for r in resumed:
        assert r["loss"] == pytest.approx(full[r["step"]], rel=1e-6, abs=1e-6), r["step"]


def test_corpus_smaller_than_one_batch_is_refused(data_dir, tmp_path):
    config = write_config(tmp_path, data_dir, "big", train={"micro_batch": 1_000_000})
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2 and "fewer than one global batch" in proc.stderr
    assert not (tmp_path / "big" / "checkpoints").exists()


def test_eval_on_two_ranks_matches_one_and_reports_word_perplexity(reference_runs, tmp_path):
    """`torchrun -m sparse_lm eval` splits the windows over 2 ranks: same sums as one process.
    Word perplexity is exp(nats / words) with words counted on the decoded held-out text."""
    trained = reference_runs("topkast")
    args = ["eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", "heldout", "--context", "32"]
    run_cli(*args, "--json", str(tmp_path / "one.json"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                "-m", "sparse_lm"]
    proc = run_cli(*args, "--json", str(tmp_path / "two.json"), launcher=launcher)
    assert proc.stdout.count("word perplexity") == 1 and "2 ranks" in proc.stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["ranks"], two["ranks"]) == (1, 2) and two["tokens"] == one["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    from sparse_lm.data.packed import PackedSplit
    from sparse_lm.data.tokenizer import Tokenizer

    data = Path(json.loads((trained / "checkpoints" / "step_00000012" / "manifest.json")
                           .read_text())["config"]["data"]["path"])
    split, tok = PackedSplit(data, "heldout"), Tokenizer(data / "tokenizer.model")
    docs, current = [], []
    for t in np.asarray(split.tokens).tolist():  # documents end with EOS
        if t == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert one["words"] == sum(len(doc.split()) for doc in docs) > 0
    assert one["word_perplexity"] == pytest.approx(math.exp(one["loss"] * one["tokens"] / one["words"]), rel=1e-9)


@pytest.mark.parametrize("case", ["heldout_too_short", "resume_without_checkpoint"])
def test_bad_data_or_resume_is_refused_before_anything_is_built(data_dir, tmp_path, case):
    """The one-line error comes before the kernels compile (an empty TORCH_EXTENSIONS_DIR stays
    empty), before the model and the DeepSpeed engine exist (no "model:" line, no checkpoints)."""
    sections = {"sparsity": {"method": "topkast", "density": 0.2, "exploration": 0.2}}
    if case == "heldout_too_short":  # a window one token longer than the held-out split (training: ~150k tokens)
        seq_len = json.loads((data_dir / "meta.json").read_text())["splits"]["heldout"]["tokens"]
        sections |= {"train": {"seq_len": seq_len}, "model": {"max_seq_len": seq_len}}
        expected = f"fewer than one window of train.seq_len+1={seq_len + 1}"
    else:
        sections["checkpoint"] = {"resume": "must"}
        expected = "checkpoint.resume=must (or --resume) but no checkpoint is there"
    config = write_config(tmp_path, data_dir, "run", **sections)
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    proc = run_cli("pretrain", "--config", str(config), check=False,
                   env={"TORCH_EXTENSIONS_DIR": str(extensions), "SPARSE_LM_COMPILED_KERNELS": "1"})
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
    assert len([x for x in proc.stderr.splitlines() if "error:" in x]) == 1, proc.stderr[-2000:]
    assert "model:" not in proc.stdout and not list(extensions.iterdir())
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """A dataset prepared with another tokenizer (vocabulary 640) than the `data_dir` runs."""
    from sparse_lm.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("other") / "stdlib"
    prepare_data(["stdlib"], out, vocab_size=640, heldout_fraction=0.05, max_bytes=200_000)
    return out


def test_data_from_another_tokenizer_is_refused(trained, other_data, tmp_path):
    _resume_dir(trained, tmp_path, "resumed")
    config = write_config(tmp_path, other_data, "resumed")
    proc = run_cli("pretrain", "--config", str(config), "--resume", check=False)
    assert proc.returncode == 2 and "tokenised with a different tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert ("prepare-data --tokenizer" in proc.stderr
            and len([x for x in proc.stderr.splitlines() if "error:" in x]) == 1)
    proc = run_cli("eval", "--checkpoint", str(trained / "checkpoints"), "--corpus", "heldout", "--data",
                   str(other_data), check=False)
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr


def test_unwritable_output_directory_is_refused_at_start(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path, data_dir, "run", train={"out_dir": str(blocker / "run")})
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2 and f"train.out_dir {blocker / 'run'}: cannot write there" in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if "error:" in x]) == 1, proc.stderr[-2000:]
    # result files: refused before any training or scoring (the eval checkpoint does not even exist)
    config = write_config(tmp_path, data_dir, "run")
    for args, field in ((["pretrain", "--config", str(config), "--summary-json"], "--summary-json"),
                        (["eval", "--checkpoint", str(tmp_path / "none"), "--json"], "--json")):
        for target in (blocker / "out.json", tmp_path):
            proc = run_cli(*args, str(target), check=False)
            assert proc.returncode == 2 and f"{field} {target}: cannot write there" in proc.stderr, proc.stderr[-2000:]
            assert len([x for x in proc.stderr.splitlines() if "error:" in x]) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_allocation_table_reads_a_spartan_checkpoint(reference_runs, tmp_path):
    """tools/allocation_table.py: per-layer densities of every allocation from a trained Spartan
    checkpoint; each allocation spends the same total, the trained one's budgets are the checkpoint's."""
    run = reference_runs("spartan-global")
    out = tmp_path / "allocation.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "allocation_table.py"),
                    "--checkpoint", str(run / "checkpoints"), "--pipeline", "2", "--repeats", "1",
                    "--json", str(out), "--markdown", str(tmp_path / "a.md")],
                   check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    totals = {name: sum(budgets.values()) for name, budgets in report["budgets"].items()}
    assert len(totals) == 4 and len(set(totals.values())) == 1, totals
    assert all(len(densities) == 2 for densities in report["per_layer_density"].values())
    assert "global reallocate (1 process)" in report["timings"]
    assert "| layer |" in (tmp_path / "a.md").read_text()


def test_exploration_penalty_counts_once_per_step_under_gradient_accumulation(data_dir, tmp_path):
    """λθ belongs to a step's gradient once: two micro-batches of 2 sequences (DeepSpeed scales each
    loss by 1/2, each backward adds λθ/2) train as one batch of 4. λ is large here, so that a
    penalty counted per micro-batch would move the losses far beyond summation-order noise."""
    sparsity = {**REFERENCE_VARIANTS["topkast"]["sparsity"], "penalty": 0.5}
    losses = {}
    for accum in (1, 2):
        config = write_config(tmp_path, data_dir, f"accum{accum}", sparsity=sparsity,
                              train={"micro_batch": 4 // accum, "grad_accum": accum, "steps": 6})
        run_cli("pretrain", "--config", str(config))
        losses[accum] = [r["loss"] for r in records(tmp_path / f"accum{accum}", "step")]
    assert len(losses[1]) == 6 and losses[2] == pytest.approx(losses[1], rel=1e-5)
