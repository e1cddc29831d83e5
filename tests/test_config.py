"""Config loading, overrides and validation errors that name the field."""

from pathlib import Path

import pytest

from sparse_lm.config import load_config, parse_overrides
from sparse_lm.errors import UserError


def test_tiny_preset_loads_and_overrides_apply():
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "model.tie_embeddings=true", "train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.model.tie_embeddings is True and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.d_model == 256


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
                                        if not p.name.startswith("study-")))
def test_presets_are_valid(path):
    load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=0", "config field train.steps: expected an integer >= 1, got 0"),
        ("train.steps=abc", "config field train.steps: expected an integer, got 'abc'"),
        ("model.n_heads=3", "config field model.n_heads: expected a divisor of model.d_model=256, got 3"),
        ("train.seq_len=4096", "config field train.seq_len: expected at most model.max_seq_len=256, got 4096"),
        ("train.precision=fp8", "config field train.precision: expected one of: auto, fp32, bf16, got 'fp8'"),
        ("model.tie_embeddings=maybe", "config field model.tie_embeddings: expected true or false, got 'maybe'"),
        ("data.heldout_fraction=1.5", "config field data.heldout_fraction: expected a number in (0, 1), got 1.5"),
        ("sparsity.method=magic",
         "config field sparsity.method: expected one of: dense, static, topkast, spartan, rigl, got 'magic'"),
        ("sparsity.density=0", "config field sparsity.density: expected a number in (0, 1], got 0.0"),
        ("sparsity.exploration=0.95", "config field sparsity.exploration: expected at most 1 - sparsity.density = 0.9"),
        ("sparsity.granularity=block sparsity.block_size=48",
         "config field sparsity.block_size: expected a divisor of model.d_model=256, got 48"),
        ("sparsity.targets=q_proj,lm_head", "config field sparsity.targets: expected a non-empty list drawn from"),
        ("sparsity.complement=disk",
         "config field sparsity.complement: expected one of: regenerate, offload, got 'disk'"),
        ("sparsity.promote=best", "config field sparsity.promote: expected one of: any, trained, got 'best'"),
        ("sparsity.method=static sparsity.promote=trained",
         "config field sparsity.promote: expected any with sparsity.method=static (it does not pick A within B)"),
        ("sparsity.method=topkast sparsity.churn_cap=0",
         "config field sparsity.churn_cap: expected a number in (0, 1]"),
        ("sparsity.method=rigl sparsity.churn_cap=0.3",
         "config field sparsity.churn_cap: expected null with sparsity.method=rigl (it does not pick A within B)"),
        ("parallel.zero_stage=3", "config field parallel.zero_stage: expected 0 or 1"),
        ("parallel.tensor=3", "config field parallel.tensor: expected a divisor of model.n_heads"),
        ("parallel.pipeline=0", "config field parallel.pipeline: expected an integer in [1, model.n_layers"),
        ("parallel.pipeline=2 model.tie_embeddings=true",
         "config field model.tie_embeddings: expected false with parallel.pipeline > 1"),
        ("parallel.shard_headroom=-1", "config field parallel.shard_headroom: expected a number >= 0"),
        ("train.max_bad_steps=0", "config field train.max_bad_steps: expected an integer >= 1, got 0"),
        ("train.lr=.inf", "config field train.lr: expected a finite number, got inf"),
        ("train.lr=inf", "config field train.lr: expected a finite number, got inf"),
        ("train.grad_clip=.nan", "config field train.grad_clip: expected a finite number, got nan"),
        ("sparsity.freeze_masks_after=-.inf",
         "config field sparsity.freeze_masks_after: expected a finite number, got -inf"),
        ("train.seed=100000000000000",
         "config field train.seed: expected an integer in [0, 2^31), got 100000000000000"),
        ("train.seed=-1", "config field train.seed: expected an integer in [0, 2^31), got -1"),
        ("train.stpes=3", "--set: unknown field train.stpes"),
        ("trian.steps=3", "--set: unknown section 'trian'"),
        ("steps=3", "expected section.field=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(UserError) as err:
        load_config("configs/tiny.yaml", override.split())
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file .*missing.yaml: not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  d_model: [1,\n")
    with pytest.raises(UserError, match="invalid YAML at line"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3\n")
    with pytest.raises(UserError, match="section 'model' must be a mapping"):
        load_config(scalar)


def test_override_values_are_yaml_typed():
    assert parse_overrides(["a.b=1", "a.c=0.5", "a.d=true", "a.e=x"]) == {"a": {"b": 1, "c": 0.5, "d": True, "e": "x"}}


def test_block_straddling_tensor_parallel_shards_names_the_layer_and_shard():
    overrides = ["model.d_model=128", "model.ffn_hidden=384", "sparsity.method=spartan", "sparsity.granularity=block",
                 "sparsity.block_size=128", "parallel.tensor=2"]
    with pytest.raises(UserError) as info:
        load_config("configs/tiny.yaml", overrides)
    assert str(info.value) == (
        "config field sparsity.block_size: expected a divisor of every tensor-parallel shard (a block never "
        "straddles two ranks): q_proj [128, 128] is [64, 128] on each of parallel.tensor=2 ranks, got 128")


def test_every_field_has_a_one_line_docstring():
    import dataclasses

    from sparse_lm.config import SECTIONS, field_docs

    for name, section in SECTIONS.items():
        docs = field_docs(section)
        for item in dataclasses.fields(section):
            assert docs.get(item.name, "").strip(), f"{name}.{item.name} has no docstring"
            assert "\n" not in docs[item.name], f"{name}.{item.name}: docstring is not one line"


def test_choice_fields_are_literals_checked_also_for_configs_built_in_python():
    import typing

    from sparse_lm.config import SECTIONS, RunConfig, SparsityConfig, TrainConfig

    hints = {f"{s}.{k}": h for s, section in SECTIONS.items() for k, h in typing.get_type_hints(section).items()}
    for name in ("sparsity.method", "sparsity.granularity", "sparsity.complement", "sparsity.allocation",
                 "sparsity.candidates", "train.precision", "checkpoint.resume"):
        assert typing.get_origin(hints[name]) is typing.Literal, name
    with pytest.raises(UserError, match=r"^config field sparsity.method: expected one of: dense, static, topkast, "
                                        r"spartan, rigl, got 'magic'$"):
        RunConfig(sparsity=SparsityConfig(method="magic")).validate()
    with pytest.raises(UserError, match=r"^config field train.precision: expected one of: auto, fp32, bf16, "
                                        r"got 'fp8'$"):
        RunConfig(train=TrainConfig(precision="fp8")).validate()


@pytest.mark.parametrize("automatic", ["null", "0", None])
def test_automatic_model_fields_are_resolved_once_under_their_own_name(tmp_path, automatic):
    """null, 0 (older configs) and leaving the field out all mean automatic: n_kv_heads = n_heads,
    ffn_hidden = Llama's 8/3·d rounded up to 64 of the final d_model (after --set), vocab_size
    stays null for the tokenizer to settle."""
    from sparse_lm.config import config_from_dict

    fields = "" if automatic is None else "".join(f"  {f}: {automatic}\n" for f in ("vocab_size", "n_kv_heads",
                                                                                    "ffn_hidden"))
    path = tmp_path / "auto.yaml"
    path.write_text(f"model:\n  d_model: 256\n  n_heads: 4\n{fields}")
    cfg = load_config(path, ["model.d_model=128"])
    assert (cfg.model.vocab_size, cfg.model.n_kv_heads, cfg.model.ffn_hidden) == (None, 4, 384)
    assert config_from_dict(cfg.to_dict()) == cfg
    stored = cfg.to_dict()
    stored["model"].update(vocab_size=0, n_kv_heads=0, ffn_hidden=0)  # as checkpoints before null was allowed
    assert config_from_dict(stored) == cfg
    explicit = load_config(path, ["model.n_kv_heads=2", "model.ffn_hidden=320", "model.vocab_size=512"])
    assert (explicit.model.vocab_size, explicit.model.n_kv_heads, explicit.model.ffn_hidden) == (512, 2, 320)


def test_negative_automatic_field_names_the_field():
    with pytest.raises(UserError, match=r"^config field model.n_kv_heads: expected an integer >= 1, or null "
                                        r"\(automatic\), got -2$"):
        load_config("configs/tiny.yaml", ["model.n_kv_heads=-2"])


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    """YAML that reads back to the same config (--set applied, ffn_hidden/n_kv_heads resolved, every
    field commented), a header naming what stays automatic, exit 0, no run directory."""
    import yaml

    from sparse_lm.cli import main

    out_dir = tmp_path / "run"
    overrides = ["model.d_model=128", "train.steps=7", f"train.out_dir={out_dir}"]
    capsys.readouterr()
    assert main(["pretrain", "--config", "configs/tiny.yaml", "--set", *overrides, "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(printed) == load_config("configs/tiny.yaml", overrides)
    tree = yaml.safe_load(text)
    assert (tree["model"]["ffn_hidden"], tree["model"]["n_kv_heads"], tree["train"]["steps"]) == (384, 4, 7)
    assert "#   model.vocab_size: null → the tokenizer's size in data/stdlib" in text
    assert "#   train.precision: auto → bf16 on a CUDA device" in text
    assert ("  # Key/value heads (grouped-query attention); null: n_heads (multi-head attention).\n"
            "  n_kv_heads: 4") in text
    assert not out_dir.exists()
