"""Quality study: methods (dense, static, Top-KAST, Spartan, a smaller dense model, ...) each tuned by
the same protocol, then compared at their selected settings over several seeds and a long horizon,
each run evaluated on the held-out split by `sparse-lm eval`.

    python tools/study.py --config configs/study-fair.yaml --out docs/results/fair
    python tools/study.py --config configs/study-cpu.yaml --corpus notes/ more.jsonl --out runs/study-mine

The study config holds a `base` run config (model, train, data, ...) and `variants`: a name →
overrides of the base (`sparsity`, `model`, `train`, ...) plus, optionally:
* `grid`: {section.field: [values]} — the variant is trained at every combination (at the first
  seed) and its setting is selected by the mean *training* loss over the last `select_fraction`
  (default 0.1) of the steps; a numeric axis is tuned, and each value of a non-numeric axis
  (e.g. `sparsity.supar: [false, true]`) is a slice tuned on its own. A best point on the edge
  of a numeric axis gets one more point beyond it, until it is interior (at most `max_extensions`
  rounds, default 3); one still on an edge is flagged in the report, as "(range limit)" where the
  next point would leave the field's valid range (e.g. a fraction past 1), which is not run;
* `refine: true` — after the extensions, half steps around the selection: on each numeric axis the
  midpoints (geometric for positive values) between the best point and its neighbours, the other
  axes kept; the selection is then the best of all (the grid's ×3.3 steps can hide an optimum,
  more so for a variant that tunes two axes);
* `inherit`: {variant: [section.field, ...]} — take these fields from that (earlier) variant's
  selected setting, e.g. dense's tuned hidden-rate multiplier for the sparse methods;
* `small_dense`: NAME — a dense model whose width is chosen so that its parameter count is
  closest to the forward non-zeros of variant NAME (width and FFN scaled together, heads kept).
`seeds` (default: the base's train.seed): the selected setting of every variant also runs at the
other seeds, all variants at one seed before the next. `horizon`: overrides (e.g. {train: {steps:
2400}}) of one more run per variant at its selected setting and the first seed, compared with the
first variant's at equal tokens and at equal training FLOPs (on its held-out curve). Every run is one
pass over the data at most, so no token is seen twice and the selection loss is unbiased for fresh
windows of the training split (not for unseen documents: late in a long run a fresh window's file is
mostly trained on already, docs/results.md *Long horizon*); the held-out split is only for the
reported numbers. `extra_eval`: {corpora: {NAME: path}, phases:
[grid, seed, horizon] (default all), stride: N (default `sparse-lm eval`'s)} — more held-out text
each run of those phases is scored on (`sparse-lm eval --corpus path`, in `eval-NAME.json`), e.g.
the documents a corpus's `--max-bytes` cut left out (tools/corpus_beyond.py): a prepared held-out
split is a small sample, and a few long documents can decide a comparison on it. Like the held-out
split it is never used for choosing; a finished run whose checkpoints are gone reports it as missing.

`reuse`: [DIR, ...] — other studies' `--out` folders whose finished runs count as this study's
where the config is the same (seed included, where it writes excluded): a study that re-tunes
another's selection at a new length starts from that study's runs instead of training them again
or keeping a copy. Within a study the same holds between its own variants (e.g. two axes' grids
that meet at one point). A taken run is read where it lies (its `eval-NAME.json` for this study's
`extra_eval` is written there if missing) and its record names that folder in `same_as`.

Each run is a `sparse-lm pretrain` subprocess under `<out>/runs/<variant>[/<setting>][/seed<S>]`
(`.../horizon` for the long run); a finished run is skipped, an interrupted one resumes from its
last checkpoint, a diverged one (non-finite loss) is recorded as such and never selected, so the
study can be stopped and restarted at will. After every run it rewrites `<out>/results.json`
(every run's record, each variant's selection, its mean ± sample standard deviation over seeds and
its differences from the first variant paired by seed) and `<out>/results.md`; at the end
`<out>/loss_vs_tokens.png`, `<out>/loss_vs_flops.png` and `<out>/ppl_vs_density.png`. One run at a
time: start it with OMP_NUM_THREADS=1 to leave the machine's other cores free.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

import study_grid
import study_tables

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_lm.atomic import to_json, write_text  # noqa: E402
from sparse_lm.config import config_from_dict  # noqa: E402
from sparse_lm.errors import UserError  # noqa: E402
from sparse_lm.methods.registry import method_of  # noqa: E402
from sparse_lm.parallel.layout import block_linear_shapes  # noqa: E402
from sparse_lm.plan.flops import training_flops_per_token  # noqa: E402
from sparse_lm.sparsity.allocation import sparse_linear_shapes, uniform_budgets  # noqa: E402


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for section, fields in overrides.items():
        out.setdefault(section, {}).update(fields)
    return out


def parameter_counts(tree: dict, vocab_size: int) -> tuple[int, int]:
    """(all parameters of the dense-equivalent model, forward non-zeros: A of the sparse linears
    plus everything dense) for a run config tree."""
    cfg = config_from_dict(_merge(tree, {"model": {"vocab_size": vocab_size}}))
    m = cfg.model
    block = sum(rows * cols for rows, cols in block_linear_shapes(m).values()) + 2 * m.d_model
    total = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.n_layers * block + m.d_model
    if not method_of(cfg.sparsity.method).sparse:
        return total, total
    b2 = cfg.sparsity.block**2
    sparse = sum(s.rows * s.cols for s in sparse_linear_shapes(cfg))
    kept = sum(uniform_budgets(cfg).values()) * b2  # |A| of every method (Spartan's allocations keep the total)
    return total, total - sparse + kept


def small_dense(base: dict, target: int, vocab_size: int) -> dict:
    """Overrides for a dense model of the base's shape scaled in width to ≈ `target` parameters."""
    model = config_from_dict(base).model
    step = 2 * model.n_heads  # keeps an even head dimension
    best = None
    for d_model in range(step, model.d_model + 1, step):
        ffn = 64 * max(1, round(model.ffn_hidden * d_model / model.d_model / 64))
        tree = _merge(base, {"model": {"d_model": d_model, "ffn_hidden": ffn}, "sparsity": {"method": "dense"}})
        count = parameter_counts(tree, vocab_size)[0]
        if best is None or abs(count - target) < abs(best[0] - target):
            best = (count, {"model": {"d_model": d_model, "ffn_hidden": ffn}, "sparsity": {"method": "dense"}})
    return best[1]


def _run(args: list[str], log: Path, diverge_ok: bool = False) -> bool:
    """Run a `sparse-lm` subcommand, appending its output to `log`. False if it stopped on
    non-finite losses and `diverge_ok` (a learning rate too high for the model), else it must pass."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "sparse_lm", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if proc.returncode and diverge_ok and DIVERGED in log.read_text()[-4000:]:
        return False
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")
    return True


# What `sparse-lm pretrain` says when it stops on `train.max_bad_steps` non-finite steps in a row.
DIVERGED = "consecutive steps with non-finite loss or gradients"


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


PROTOCOL_KEYS = ("grid", "inherit", "refine")  # a variant's keys that are not config overrides
PHASES = ("grid", "seed", "horizon")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _placeless(tree: dict) -> dict:
    """A run config without where it writes, which moves with the study's --out."""
    out = copy.deepcopy(tree)
    out.get("train", {}).pop("out_dir", None)
    out.get("checkpoint", {}).pop("dir", None)
    return out


def _config_key(tree: dict) -> str:
    """What makes two runs the same run: their config without where they write, as `run`'s config
    check compares it (`==`, under which an integer equals the float of its value: `lr: 1` is
    `lr: 1.0`), in a form that can key a dict."""
    def number(value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    def canonical(node):
        if isinstance(node, dict):
            return {k: canonical(v) for k, v in node.items()}
        return [canonical(v) for v in node] if isinstance(node, list) else number(node)
    return json.dumps(canonical(_placeless(tree)), sort_keys=True)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "eval.json").is_file() or (run_dir / "diverged").is_file()


class FinishedRuns:
    """The finished runs under some studies' `--out` folders, by config: a run this study is about
    to start is looked up here first. Read once per invocation (one small YAML per run), then kept
    current with the runs this invocation finishes."""

    def __init__(self, outs: list[Path]):
        self.by_key: dict[str, Path] = {}
        for out in outs:
            for config in sorted(out.glob("runs/**/config.yaml")):
                if _finished(config.parent):
                    self.by_key.setdefault(_config_key(yaml.safe_load(config.read_text())), config.parent)

    def find(self, tree: dict) -> Path | None:
        return self.by_key.get(_config_key(tree))

    def add(self, tree: dict, run_dir: Path) -> None:
        if _finished(run_dir):
            self.by_key.setdefault(_config_key(tree), run_dir)


def _mean_sd(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


class Study:
    """One study config's runs: trains (or reads) them in protocol order and keeps the report current."""

    def __init__(self, args: argparse.Namespace, spec: dict, base: dict, vocab: int):
        self.args, self.spec, self.base, self.vocab = args, spec, base, vocab
        self.variants: dict[str, dict] = spec["variants"]
        self.seeds: list[int] = spec.get("seeds") or [config_from_dict(base).train.seed]
        self.fraction = float(spec.get("select_fraction", 0.1))
        self.max_extensions = int(spec.get("max_extensions", 3))
        self.runs: list[dict] = []
        self.selected: dict[str, dict] = {}  # variant → its selection (see `tune`)
        self.started, self.trained = time.time(), 0
        self.finished = FinishedRuns([args.out, *map(Path, spec.get("reuse") or [])])

    # ------------------------------------------------------------------ settings
    def overrides(self, name: str) -> dict:
        """The variant's overrides of the base, with `small_dense` and `inherit` resolved."""
        spec = {k: v for k, v in (self.variants[name] or {}).items() if k not in PROTOCOL_KEYS}
        if "small_dense" in spec:
            ref = self.variants[spec.pop("small_dense")]
            ref = {k: v for k, v in ref.items() if k not in PROTOCOL_KEYS}
            target = parameter_counts(_merge(self.base, ref), self.vocab)[1]
            spec = _merge(spec, small_dense(self.base, target, self.vocab))
        for source, fields in ((self.variants[name] or {}).get("inherit") or {}).items():
            if source not in self.selected:
                raise SystemExit(f"{self.args.config}: variant {name} inherits from {source}, which has no selected "
                                 "setting yet (list it earlier, and let its grid finish)")
            tree = self.selected[source]["tree"]
            for field in fields:
                section, _, key = field.partition(".")
                spec = _merge(spec, {section: {key: tree[section][key]}})
        return spec

    def tune(self, name: str, train: bool) -> None:
        """The variant's grid at the first seed, extended until each slice's best is interior; its
        selection goes to `self.selected`."""
        grid = (self.variants[name] or {}).get("grid") or {}
        try:
            points = study_grid.expand(grid)
        except ValueError as exc:
            raise SystemExit(f"{self.args.config}: variant {name}: {exc}") from None
        overrides = self.overrides(name)
        done: list[tuple[dict, dict]] = []
        limits: set[str] = set()  # axes whose next point would leave the field's valid range
        for _ in range(self.max_extensions + 1):
            for point in points:
                record = self.run(name, overrides, point, self.seeds[0], "grid", train, tag=bool(grid))
                if record is not None:
                    done.append((point, record))
            tried = [p for p, _ in done]
            losses = [r["selection_loss"] for _, r in done]
            points = []
            for point in study_grid.extensions(tried, losses) if grid else []:
                invalid = self._invalid(overrides, point)
                if invalid is None:
                    points.append(point)
                else:
                    limits.update(f for f in point if point[f] not in {p.get(f) for p in tried})
                    print(f"[study] {name} {study_grid.label(point)}: not run, beyond the valid range ({invalid}); "
                          "its neighbour on the edge is the range's limit", flush=True)
            if not points:
                break
        if grid and (self.variants[name] or {}).get("refine"):
            tried, losses = [p for p, _ in done], [r["selection_loss"] for _, r in done]
            for point in study_grid.refinements(tried, losses):
                record = self.run(name, overrides, point, self.seeds[0], "grid", train)
                if record is not None:
                    done.append((point, record))
        if not done:
            return
        tried, losses = [p for p, _ in done], [r["selection_loss"] for _, r in done]
        slices = {}
        on_edge = lambda point: [f"{f} (range limit)" if f in limits else f  # noqa: E731
                                 for f in study_grid.edges(point, tried)]
        for key, index in study_grid.selections(tried, losses).items():
            point, record = done[index]
            slices[study_grid.label(dict(key))] = {
                "setting": point, "selection_loss": record["selection_loss"], "perplexity": record["perplexity"],
                "lr_groups": record["lr_groups"], "on_edge": on_edge(point)}
        pick = study_grid.best(tried, losses)
        if pick is None:
            raise SystemExit(f"variant {name}: every run of its grid diverged; lower its learning rates")
        point, record = done[pick]
        self.selected[name] = {"setting": point, "tree": record["tree"], "selection_loss": record["selection_loss"],
                               "lr_groups": record["lr_groups"], "on_edge": on_edge(point),
                               "slices": slices, "grid_points": len(done)}

    def _invalid(self, overrides: dict, point: dict) -> str | None:
        """Why the variant's config at `point` is refused (a grid extension past a field's range,
        e.g. a fraction above 1), or None if it is valid."""
        try:
            self._config(self._tree(overrides, point))
        except UserError as exc:
            return str(exc)
        return None

    def _tree(self, overrides: dict, point: dict, extra: dict | None = None) -> dict:
        """The run config of a variant (its `overrides`) at a grid `point`, with `extra` on top."""
        return _merge(_merge(_merge(self.base, overrides), study_grid.nested(point)), extra or {})

    def _config(self, tree: dict):
        """A run config tree as the validated config, with the study's padded vocabulary."""
        return config_from_dict(_merge(tree, {"model": {"vocab_size": self.vocab}}))

    # ------------------------------------------------------------------ one run
    def run(self, name: str, overrides: dict, point: dict, seed: int, phase: str, train: bool,
            tag: bool = True, extra: dict | None = None) -> dict | None:
        """Train (or resume, or skip if finished) and evaluate one run; its record (None when
        `train` is off and it has not finished)."""
        parts = [name] + ([study_grid.slug(point)] if tag else [])
        if phase == "horizon":
            parts.append("horizon")
        elif len(self.seeds) > 1:
            parts.append(f"seed{seed}")
        run_dir = self.args.out.joinpath("runs", *parts)
        tree = _merge(self._tree(overrides, point, extra), {"train": {"out_dir": str(run_dir), "seed": seed},
                                                           "checkpoint": {"dir": str(run_dir / "checkpoints")}})
        try:
            cfg = self._config(tree)
        except UserError as exc:
            raise SystemExit(f"{self.args.config}: variant {name} ({study_grid.label(point)}): {exc}") from None
        config_path = run_dir / "config.yaml"
        same_as = None if config_path.is_file() else self.finished.find(tree)
        if same_as is not None:
            run_dir, config_path = same_as, same_as / "config.yaml"
        summary_path, eval_path, diverged_path = run_dir / "summary.json", run_dir / "eval.json", run_dir / "diverged"
        finished = _finished(run_dir)
        if not train and not finished:
            return None
        if same_as is None and not config_path.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(config_path, yaml.safe_dump(tree, sort_keys=False))
        elif same_as is None and _placeless(yaml.safe_load(config_path.read_text())) != _placeless(tree):
            raise SystemExit(f"{config_path}: this run was started with another config than the study now gives it "
                             f"(a changed base, variant or inherited selection); move {run_dir} away to rerun it")
        what = f"{name} {study_grid.label(point)} seed {seed}" + (" (horizon)" if phase == "horizon" else "")
        started = time.time()
        if not finished and not summary_path.is_file():
            print(f"[study] {what}: training ({self._pace()})", flush=True)
            if not _run(["pretrain", "--config", str(config_path), "--summary-json", str(summary_path)],
                        run_dir / "train.log", diverge_ok=True):
                write_text(diverged_path, "non-finite losses: stopped by train.max_bad_steps\n")
            self.trained += 1
        if not diverged_path.is_file() and not eval_path.is_file():
            print(f"[study] {what}: eval", flush=True)
            _run(["eval", "--checkpoint", str(run_dir / "checkpoints"), "--corpus", "heldout", "--json",
                  str(eval_path)], run_dir / "eval.log")
        if not diverged_path.is_file():
            self.extra_evals(run_dir, phase, what)
        self.finished.add(tree, run_dir)
        record = self._record(name, phase, point, seed, cfg, tree, overrides, run_dir, started)
        record["same_as"] = None if same_as is None else _shown(same_as)
        print(f"[study] {what}: selection loss {record['selection_loss']:.4f}, ppl {record['perplexity']:.2f}"
              + (f" (the run in {record['same_as']})" if same_as is not None else ""), flush=True)
        self.runs.append(record)
        self.write_report()
        return record

    def extra_evals(self, run_dir: Path, phase: str, what: str) -> None:
        """Score a finished run on each `extra_eval` corpus it has no result for yet."""
        extra = self.spec.get("extra_eval") or {}
        stride = ["--stride", str(extra["stride"])] if extra.get("stride") else []
        for name, corpus in self.extra_corpora(phase).items():
            path = run_dir / f"eval-{name}.json"
            if path.is_file():
                continue
            if not (run_dir / "checkpoints").is_dir():
                print(f"[study] {what}: no checkpoints left to score on {name}; reported as missing", flush=True)
                continue
            print(f"[study] {what}: eval on {name}", flush=True)
            corpus = corpus if str(corpus).startswith("hf:") else Path(corpus).resolve()
            _run(["eval", "--checkpoint", str(run_dir / "checkpoints"), "--corpus", str(corpus), *stride,
                  "--json", str(path)], run_dir / f"eval-{name}.log")

    def extra_corpora(self, phase: str) -> dict:
        """The `extra_eval` corpora that runs of `phase` are scored on, by name."""
        extra = self.spec.get("extra_eval") or {}
        return extra["corpora"] if extra and phase in extra.get("phases", PHASES) else {}

    def _pace(self) -> str:
        if not self.trained:
            return "first run of this invocation"
        per = (time.time() - self.started) / self.trained
        return f"{self.trained} trained in {(time.time() - self.started) / 60:.0f} min, {per / 60:.1f} min each"

    def _record(self, name: str, phase: str, point: dict, seed: int, cfg, tree: dict, overrides: dict,
                run_dir: Path, started: float) -> dict:
        diverged = (run_dir / "diverged").is_file()
        steps = {r["step"]: r["loss"] for r in _records(run_dir, "step")}  # a resumed step: its last record
        summary = {} if diverged else json.loads((run_dir / "summary.json").read_text())
        evaluation = ({"perplexity": math.nan, "bits_per_byte": math.nan, "loss": math.nan} if diverged
                      else json.loads((run_dir / "eval.json").read_text()))
        total, nonzero = parameter_counts(tree, self.vocab)
        params = _records(run_dir, "parameterisation")
        lr_groups = params[-1]["lr_groups"] if params else summary.get("lr_groups")
        return {
            "name": name, "phase": phase, "setting": point, "method": cfg.sparsity.method,
            "supar": cfg.sparsity.supar, "seed": seed, "seeds": [seed], "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.train.seq_len * cfg.train.micro_batch * cfg.train.grad_accum,
            "diverged": diverged, "lr_groups": lr_groups, "init_std": params[-1]["init_std"] if params else None,
            "selection_loss": study_grid.selection_loss(steps, cfg.train.steps, self.fraction),
            "perplexity": evaluation["perplexity"], "bits_per_byte": evaluation["bits_per_byte"],
            "overrides": _merge(overrides, study_grid.nested(point)), "tree": tree,
            "parameters": total, "forward_nonzeros": nonzero, "nonzero_fraction": nonzero / total,
            "train_flops_per_token": training_flops_per_token(cfg),
            "tokens_per_step": cfg.train.seq_len * cfg.train.micro_batch * cfg.train.grad_accum,
            "heldout_curve": [(r["step"], r["loss"]) for r in _records(run_dir, "heldout")],
            "train_wall_s": summary.get("train_wall_s", summary.get("wall_s")),
            "model_state_bytes": summary.get("model_state_bytes"), "eval": evaluation,
            "extra_eval": {name: _read_json(run_dir / f"eval-{name}.json") for name in self.extra_corpora(phase)},
            "this_invocation_s": time.time() - started,
        }

    # ------------------------------------------------------------------ phases
    def seeds_phase(self, train_names: set[str] | None) -> None:
        for seed in self.seeds[1:]:  # every variant at one seed before the next
            for name, chosen in self.selected.items():
                self.run(name, self.overrides(name), chosen["setting"], seed, "seed",
                         train_names is None or name in train_names, tag=self._tagged(name))

    def horizon_phase(self, train_names: set[str] | None) -> None:
        horizon = self.spec.get("horizon")
        if not horizon:
            return
        for name, chosen in self.selected.items():
            self.run(name, self.overrides(name), chosen["setting"], self.seeds[0], "horizon",
                     train_names is None or name in train_names, tag=False, extra=horizon)

    def _tagged(self, name: str) -> bool:
        return bool((self.variants[name] or {}).get("grid"))

    # ------------------------------------------------------------------ report
    def results(self, phase_of_seeds: tuple[str, ...] = ("grid", "seed")) -> dict:
        """Per variant (in study order), at its selected setting: the runs' numbers as mean ±
        sample standard deviation over seeds, the held-out curve averaged over seeds, and the selection."""
        out, by_seed = {}, {}
        for name, chosen in self.selected.items():
            mine = [r for r in self.runs if r["name"] == name and r["phase"] in phase_of_seeds
                    and r["setting"] == chosen["setting"] and not r["diverged"]]
            if not mine:
                continue
            by_seed[name] = {r["seed"]: r for r in mine}
            out[name] = _aggregate(mine) | {k: v for k, v in chosen.items() if k != "tree"}
        reference = next(iter(out), None)
        for name, r in out.items():
            if name != reference:
                r["paired"] = _paired(by_seed[name], by_seed[reference], reference)
        return out

    def horizon_results(self) -> dict:
        """The long runs, each after the first also against it: at equal tokens (the final held-out
        losses) and at equal training FLOPs (`_equal_flops`)."""
        out = {r["name"]: _aggregate([r]) | {"train_flops": r["tokens"] * r["train_flops_per_token"],
                                             "extra_eval": r.get("extra_eval", {})}
               for r in self.runs if r["phase"] == "horizon" and not r["diverged"]}
        reference = next(iter(out), None)
        for name, r in out.items():
            if name != reference:
                ref = out[reference]
                r["equal_tokens"] = {"against": reference, "heldout_loss": r["loss"]["mean"] - ref["loss"]["mean"],
                                     **{f"{k}_loss": v["loss"] - ref["extra_eval"][k]["loss"]
                                        for k, v in r["extra_eval"].items() if v and ref["extra_eval"].get(k)}}
                r["equal_flops"] = _equal_flops(r, ref, reference)
        return out

    def write_report(self) -> None:
        results, horizon = self.results(), self.horizon_results()
        runs = [{k: v for k, v in r.items() if k != "tree"} for r in self.runs]
        report = {"config": str(self.args.config), "base": self.base, "seeds": self.seeds,
                  "select_fraction": self.fraction, "runs": runs, "results": results, "horizon": horizon,
                  "machine": _machine()}
        write_text(self.args.out / "results.json", to_json(report, indent=1) + "\n")
        write_text(self.args.out / "results.md", study_tables.report(results, horizon, self.runs, self.fraction))


def _paired(mine: dict[int, dict], reference: dict[int, dict], against: str) -> dict | None:
    """A variant's differences from the reference variant (the study's first) seed by seed: runs of
    one seed share their data order, so what that order makes easy or hard cancels, and the spread
    of the differences, not of either variant's own numbers, says whether the two are apart."""
    seeds = sorted(set(mine) & set(reference))
    if not seeds:
        return None
    heldout = [mine[s]["eval"]["loss"] - reference[s]["eval"]["loss"] for s in seeds]
    return {"against": against, "seeds": seeds, "heldout_loss": _mean_sd(heldout),
            "selection_loss": _mean_sd([mine[s]["selection_loss"] - reference[s]["selection_loss"] for s in seeds]),
            "ahead": sum(d < 0 for d in heldout)}


def _equal_flops(run: dict, reference: dict, against: str) -> dict | None:
    """The reference's loop held-out loss when it had spent this run's training FLOPs, linearly
    interpolated between its evaluations, against this run's last loop held-out loss; None where
    that point is outside the reference's curve. The reference is then mid-schedule (its learning
    rate not yet decayed), which flatters the run it is compared with: the small dense model, which
    ends its own schedule, is the comparison at equal FLOPs without that bias."""
    curve = reference["heldout_curve"]
    if not curve or not run["heldout_curve"]:
        return None
    step = run["train_flops"] / (reference["tokens_per_step"] * reference["train_flops_per_token"])
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            at = l0 + (l1 - l0) * (step - s0) / (s1 - s0)
            loss = run["heldout_curve"][-1][1]
            return {"against": against, "reference_step": step, "reference_loop_loss": at, "loop_loss": loss,
                    "loop_loss_delta": loss - at}
    return None


def _aggregate(mine: list[dict]) -> dict:
    first = mine[0]
    curve: dict[int, list[float]] = {}
    for r in mine:
        for step, loss in r["heldout_curve"]:
            curve.setdefault(step, []).append(loss)
    return {
        **{k: first[k] for k in ("method", "supar", "steps", "overrides", "parameters", "forward_nonzeros",
                                 "nonzero_fraction", "train_flops_per_token", "tokens_per_step", "model_state_bytes",
                                 "lr_groups", "init_std")},
        "seeds": [r["seed"] for r in mine], "tokens": first["tokens"],
        "perplexity": _mean_sd([r["perplexity"] for r in mine]),
        "bits_per_byte": _mean_sd([r["bits_per_byte"] for r in mine]),
        "loss": _mean_sd([r["eval"]["loss"] for r in mine]),
        "selection_losses": _mean_sd([r["selection_loss"] for r in mine]),
        "train_wall_s": _mean_sd([r["train_wall_s"] or math.nan for r in mine]),
        "heldout_curve": [(s, sum(v) / len(v)) for s, v in sorted(curve.items())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="study YAML (base + variants [+ seeds, horizon])")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--corpus", nargs="+", help="prepare these sources instead of the base's data.path")
    parser.add_argument("--only", nargs="+", help="train only these variants (the report keeps finished others)")
    parser.add_argument("--phase", choices=("grid", "seeds", "horizon", "all"), default="all",
                        help="stop after this phase (grid: tuning only; default: all)")
    args = parser.parse_args()

    spec = yaml.safe_load(args.config.read_text())
    base = spec["base"]
    unknown = set(spec) - {"base", "variants", "seeds", "horizon", "select_fraction", "max_extensions", "extra_eval",
                           "reuse"}
    if unknown:
        raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}")
    _check_extra_eval(args.config, spec.get("extra_eval"))
    _check_reuse(args.config, spec.get("reuse"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        data = args.out / "data"
        _run(["prepare-data", "--corpus", *args.corpus, "--out", str(data),
              "--vocab-size", str(base.get("data", {}).get("vocab_size", 4096))], args.out / "prepare.log")
        base = _merge(base, {"data": {"path": str(data)}})
    meta_path = Path(base["data"]["path"]) / "meta.json"
    if not meta_path.is_file():
        raise SystemExit(f"data.path {meta_path.parent}: not a prepared data directory; run `sparse-lm prepare-data "
                         f"--corpus stdlib --out {meta_path.parent}` (README) or pass --corpus")
    meta = json.loads(meta_path.read_text())
    study = Study(args, spec, base, 64 * math.ceil(meta["vocab_size"] / 64))
    train_names = set(args.only) if args.only else None
    for name in study.variants:
        study.tune(name, train_names is None or name in train_names)
    if args.phase in ("seeds", "horizon", "all"):
        study.seeds_phase(train_names)
    if args.phase in ("horizon", "all"):
        study.horizon_phase(train_names)
    study.write_report()
    results = study.results()
    if results:
        _plots(results, args.out)
    print(study_tables.selected_table(results, study.horizon_results()))


def _check_extra_eval(config: Path, extra: dict | None) -> None:
    """`extra_eval` as the docstring gives it, its corpora on disk (before hours of training)."""
    if extra is None:
        return
    if not isinstance(extra, dict) or set(extra) - {"corpora", "phases", "stride"} or not extra.get("corpora"):
        raise SystemExit(f"{config}: extra_eval: expected {{corpora: {{NAME: path, ...}}, phases: [...], stride: N}}")
    bad = set(extra.get("phases", PHASES)) - set(PHASES)
    if bad:
        raise SystemExit(f"{config}: extra_eval.phases: unknown {sorted(bad)}; expected some of {list(PHASES)}")
    for name, corpus in extra["corpora"].items():
        if not Path(corpus).exists() and not str(corpus).startswith("hf:"):
            raise SystemExit(f"{config}: extra_eval.corpora.{name}: {corpus} not found "
                             "(e.g. python tools/corpus_beyond.py --data DIR --out FILE.jsonl)")


def _shown(path: Path) -> str:
    """A run folder as the report names it: relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _check_reuse(config: Path, reuse: list | None) -> None:
    """`reuse` as a list of studies' output folders that exist."""
    if reuse is None:
        return
    if not isinstance(reuse, list) or not all(isinstance(d, str) for d in reuse):
        raise SystemExit(f"{config}: reuse: expected a list of study output folders (e.g. [docs/results/fair])")
    for folder in reuse:
        if not (Path(folder) / "runs").is_dir():
            raise SystemExit(f"{config}: reuse: {folder} has no runs/ folder; expected another study's --out")


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis, path, scale in (("training tokens (M)", "loss_vs_tokens.png", lambda r: r["tokens_per_step"] / 1e6),
                              ("training FLOPs (PFLOP)", "loss_vs_flops.png",
                               lambda r: r["tokens_per_step"] * r["train_flops_per_token"] / 1e15)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in results.items():
            steps, losses = zip(*r["heldout_curve"]) if r["heldout_curve"] else ((), ())
            ax.plot([s * scale(r) for s in steps], losses, marker=".", label=name)
        _save(fig, ax, axis, "held-out loss (nats/token, mean over seeds)", out / path)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in sorted({r["method"] for r in results.values()}):
        points = [(r["forward_nonzeros"] / 1e6, r["perplexity"]["mean"], n) for n, r in results.items()
                  if r["method"] == method]
        # A method's line joins its first run (in study order) at each size; further runs at a size
        # already on the line (controls: another learning rate, init, ...) are marked apart.
        line, seen = [], set()
        for p in points:
            if p[0] not in seen:
                seen.add(p[0])
                line.append(p)
        line.sort()
        drawn = ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=method)
        extra = [p for p in points if p not in line]
        if extra:
            ax.plot([p[0] for p in extra], [p[1] for p in extra], marker="x", linestyle="none",
                    color=drawn[0].get_color())
        for x, y, n in points:
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _save(fig, ax, "forward non-zero parameters (M)", "held-out perplexity (sparse-lm eval)",
          out / "ppl_vs_density.png")


def _save(fig, ax, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
