"""Per-group learning rates and SμPar (sparse_lm/train/param_groups.py, SparseLinear's init gain).

Against hand computations: Adam's first step moves every weight by its group's learning rate
(bias correction makes m̂/√v̂ = ±1), so one real step through the CLI shows each group's rate; a
freshly built SμPar model's block linears have a dense layer's forward variance, and the gain is
1/√ρ for a random mask and 1/√(ρ + 2qφ(q)) for the top-ρ of a Gaussian by magnitude.
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest
import torch

from sparse_lm.checkpoint.model_io import load_trained_model
from sparse_lm.config import config_from_dict, load_config
from sparse_lm.errors import UserError
from sparse_lm.model.build import build_model
from sparse_lm.model.init import init_std_of
from sparse_lm.parallel.layout import canonical_name
from sparse_lm.sparsity.storage import SparseLinear
from sparse_lm.train.param_groups import group_of, param_groups, peak_rates
from tests.cli_runs import records, run_cli, write_config

MULTS = {"lr_mult_embedding": 3.0, "lr_mult_head": 2.0, "lr_mult_hidden": 0.5, "lr_mult_norm": 0.25}


def _cfg(*overrides: str):
    return load_config(None, ["model.d_model=128", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=256",
                              "model.max_seq_len=32", "train.seq_len=32", *overrides])


def test_every_parameter_is_in_one_group_by_its_kind():
    cfg = _cfg("sparsity.method=topkast", "sparsity.density=0.2", "sparsity.targets=q_proj,up_proj",
               "sparsity.supar=true", *(f"train.{k}={v}" for k, v in MULTS.items()))
    model = build_model(cfg)
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["embedding", "head", "hidden", "hidden_sparse", "norm"]
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(set(seen)) == len(seen)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert by_param[id(param)]["name"] == group_of(name)
    mults = {g["name"]: g["lr_mult"] for g in groups}
    assert mults == {"embedding": 3.0, "head": 2.0, "hidden": 0.5, "hidden_sparse": 0.5 / 0.2, "norm": 0.25}
    assert {g["name"]: g["weight_decay"] for g in groups}["norm"] == 0.0
    assert all(g["weight_decay"] == cfg.train.weight_decay for g in groups if g["name"] != "norm")
    assert peak_rates(cfg) == pytest.approx({k: cfg.train.lr * v for k, v in mults.items()})


def test_a_tied_dense_model_has_no_head_or_sparse_group():
    cfg = _cfg("model.tie_embeddings=true")
    assert [g["name"] for g in param_groups(build_model(cfg), cfg)] == ["embedding", "hidden", "norm"]
    assert set(peak_rates(cfg)) == {"embedding", "hidden", "norm"}


@pytest.mark.parametrize("override, message", [
    ("train.lr_mult_hidden=0", "config field train.lr_mult_hidden: expected a positive number"),
    ("sparsity.supar=true", "config field sparsity.supar: expected false with sparsity.method=dense"),
])
def test_bad_group_settings_are_one_line(override, message):
    with pytest.raises(UserError, match=f"^{message}"):
        _cfg(override)


def _output_variance_ratios(cfg, samples: int = 4096) -> dict[str, float]:
    """Per block linear of a freshly built model: Var(layer(x)) for white x, over a dense layer's
    expectation fan_in·σ² at the layer's own init std σ (σ/√(2L) for residual outputs)."""
    model = build_model(cfg).eval()  # Spartan's forward set as built (its schedule has not started)
    gen = torch.Generator().manual_seed(0)
    ratios = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name.startswith("layers.") or not hasattr(module, "in_features"):
                continue
            x = torch.randn(samples, module.in_features, generator=gen)
            expected = module.in_features * init_std_of(cfg.model, name) ** 2
            ratios[name] = float(module(x).var()) / expected
    return ratios


# Top-KAST's A is the top-ρ of |θ₀|: for element granularity it keeps ρ + 2qφ(q) of a Gaussian's
# second moment, q = Φ⁻¹(1 - ρ/2); a static mask is random and keeps ρ of it.
def _magnitude_kept(rho: float) -> float:
    q = NormalDist().inv_cdf(1 - rho / 2)
    return rho + 2 * q * NormalDist().pdf(q)


@pytest.mark.parametrize("sparsity, kept", [
    (["sparsity.method=static"], lambda rho: rho),
    (["sparsity.method=topkast"], _magnitude_kept),
    (["sparsity.method=topkast", "sparsity.granularity=block", "sparsity.block_size=16",
      "sparsity.complement=offload"], None),
    (["sparsity.method=spartan", "sparsity.granularity=block", "sparsity.block_size=16"], None),
])
def test_supar_gives_a_sparse_model_the_dense_forward_variance(sparsity, kept):
    rho = 0.2
    common = [*sparsity, f"sparsity.density={rho}", "sparsity.exploration=0.1"]
    # Dense layers of this size hold their expected Σθ² within a few %; 4096 white samples add ~1%.
    dense = _output_variance_ratios(_cfg())
    assert all(r == pytest.approx(1, abs=0.06) for r in dense.values()), dense
    scaled = _output_variance_ratios(_cfg(*common, "sparsity.supar=true"))
    assert all(r == pytest.approx(1, abs=0.03) for r in scaled.values()), scaled
    plain = _output_variance_ratios(_cfg(*common))
    assert all(r < 0.75 for r in plain.values()), plain  # the switch is what closes the gap
    if kept is not None:  # the gain against the hand computation: Σ_A θ² of a random or top-ρ set
        model = build_model(_cfg(*common, "sparsity.supar=true"))
        for layer in (m for m in model.modules() if isinstance(m, SparseLinear)):
            assert layer.init_gain == pytest.approx(1 / math.sqrt(kept(rho)), rel=0.08), layer.name


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, data_dir):
    """One real optimizer step (CLI, DeepSpeed engine) at the peak rate, without weight decay or
    clipping, with a checkpoint of θ₁; Top-KAST with a dense v_proj, SμPar and every multiplier set."""
    tmp = tmp_path_factory.mktemp("one-step")
    config = write_config(
        tmp, data_dir, "run",
        sparsity={"method": "topkast", "density": 0.25, "exploration": 0.25, "reselect_every": 100,
                  "targets": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "supar": True},
        train={"steps": 1, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "eps": 1e-12, **MULTS},
        checkpoint={"every": 1})
    run_cli("pretrain", "--config", str(config))
    return tmp / "run"


def test_one_adam_step_moves_each_group_by_its_rate(one_step):
    trained, cfg, _ = load_trained_model(one_step / "checkpoints")
    initial = build_model(cfg)
    moved: dict[str, list[torch.Tensor]] = {}
    before = dict(initial.named_parameters())
    for name, param in trained.named_parameters():
        delta = (param.detach() - before[name].detach()).abs().flatten()
        moved.setdefault(group_of(canonical_name(name)), []).append(delta[delta > 0])
    want = peak_rates(cfg)
    assert set(moved) == set(want) == {"embedding", "head", "hidden", "hidden_sparse", "norm"}
    assert want["hidden_sparse"] == pytest.approx(cfg.train.lr * 0.5 / 0.25)
    for group, deltas in moved.items():
        delta = torch.cat(deltas)
        # fp32 rounding of θ ± lr: a few ulps of |θ| ≈ 0.02-1
        assert torch.median(delta).item() == pytest.approx(want[group], rel=1e-3), group
        assert delta.max().item() == pytest.approx(want[group], rel=1e-3), group


def test_the_run_records_its_rates_and_init(one_step):
    (record,) = records(one_step, "parameterisation")
    summary = json.loads((one_step / "metrics.jsonl").read_text().splitlines()[-1])
    cfg = config_from_dict(json.loads((one_step / "checkpoints" / "step_00000001" / "manifest.json").read_text())
                           ["config"])
    assert record["lr_groups"] == summary["lr_groups"] == pytest.approx(peak_rates(cfg))
    assert record["supar"] is True and summary["init_std"] == record["init_std"]
    std = cfg.model.init_std
    assert record["init_std"]["v_proj"] == pytest.approx(std)  # dense: no gain
    assert record["init_std"]["embedding"] == record["init_std"]["head"] == pytest.approx(std)
    gain = 1 / math.sqrt(_magnitude_kept(0.25))  # SμPar's, for Top-KAST's A at ρ = 0.25: 1.18
    assert record["init_std"]["q_proj"] == pytest.approx(gain * std, rel=0.08)
    assert record["init_std"]["o_proj"] == pytest.approx(gain * std / math.sqrt(2 * cfg.model.n_layers), rel=0.08)
