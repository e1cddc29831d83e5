"""`sparse-lm convert`: exported HF models compute what the sparse model computes, the HF tokenizer
gives sentencepiece's ids, importing keeps exactly the top-D / top-(D+M) of each layer, density 1
round-trips bit for bit, and bad inputs fail with one line and exit status 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_lm.checkpoint.hf import write_fresh_checkpoint
from sparse_lm.checkpoint.model_io import load_trained_model
from sparse_lm.cli import main
from sparse_lm.config import ModelConfig, RunConfig, SparsityConfig
from sparse_lm.data.tokenizer import Tokenizer, train_tokenizer
from sparse_lm.model import resolve_vocab
from sparse_lm.model.build import build_model
from sparse_lm.sparsity.storage import SparseLinear

STDLIB = Path(os.__file__).parent
REPO = Path(__file__).resolve().parents[1]

# The three kinds of text the brief names: code (ASCII with indentation), whitespace runs, non-BMP.
TEXTS = [
    (STDLIB / "json" / "encoder.py").read_text()[:4000],
    "    \t  x  =  [1,   2]\n\n\n        \n  ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀🎉 𠜎 漢字 café — naïve",
    "literal <s> and </s> and <unk> stay text",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    texts = [(STDLIB / "json" / name).read_text() for name in ("decoder.py", "encoder.py", "scanner.py", "tool.py")]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", 400)


def _run_config(vocab: int, granularity: str = "element", tie: bool = False, method: str = "topkast") -> RunConfig:
    cfg = RunConfig(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, tie_embeddings=tie),
        sparsity=SparsityConfig(method=method, density=0.3, exploration=0.2, granularity=granularity, block_size=16),
    )
    cfg.model = resolve_vocab(cfg.model, vocab)
    cfg.train.seq_len = 64
    return cfg.validate()


@torch.no_grad()
def _trained_like(model: torch.nn.Module, seed: int) -> None:
    """Scale weights up (logits of a few units, not ~0.1) and make norm gains differ from 1, so a
    mis-mapped tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        else:
            p.mul_(4.0 + torch.rand(p.shape, generator=g))


def make_checkpoint(root: Path, sp_model: Path, **kw) -> Path:
    cfg = _run_config(Tokenizer(sp_model).vocab_size, **kw)
    model = build_model(cfg)
    _trained_like(model, 7)
    write_fresh_checkpoint(root, model, cfg, sp_model, step=3)
    return root


def convert(*args: str) -> int:
    return main(["convert", *args])


@pytest.fixture(scope="module")
def transformers_llama():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM, AutoTokenizer


# ---------------------------------------------------------------- tokenizer
def test_hf_tokenizer_gives_sentencepiece_ids(tmp_path, sp_model, transformers_llama):
    _, AutoTokenizer = transformers_llama
    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model)
    assert convert("export-hf", "--from", str(ckpt), "--to", str(tmp_path / "hf")) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = Tokenizer(sp_model)
    for text in TEXTS:
        ids = hf_tok(text)["input_ids"]
        assert ids == sp.encode(text), text[:40]
        assert hf_tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (sp.bos_id, sp.eos_id)


def test_unconvertible_tokenizer_ships_as_tokenizer_model_only(tmp_path, capsys):
    """A sentencepiece model trained with a dummy prefix (e.g. one imported with an HF Llama) has
    no exact tokenizer.json here: the export still succeeds, with tokenizer.model and a note."""
    import io

    import sentencepiece as spm

    from sparse_lm.data.tokenizer import TRAINER_OPTIONS

    proto = io.BytesIO()
    texts = [(STDLIB / "json" / name).read_text() for name in ("decoder.py", "encoder.py", "scanner.py")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, vocab_size=400,
                                   **(TRAINER_OPTIONS | {"add_dummy_prefix": True}))
    (tmp_path / "prefix.model").write_bytes(proto.getvalue())
    ckpt = make_checkpoint(tmp_path / "ckpt", tmp_path / "prefix.model", method="dense")
    capsys.readouterr()
    assert convert("export-hf", "--from", str(ckpt), "--to", str(tmp_path / "hf")) == 0
    assert "note: tokenizer.model only; not converted" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.model").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 2


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("granularity, tie", [("element", False), ("block", True)])
def test_export_logits_and_perplexity_match(tmp_path, sp_model, transformers_llama, granularity, tie):
    AutoModelForCausalLM, _ = transformers_llama
    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model, granularity=granularity, tie=tie)
    out = tmp_path / "hf"
    if tie:
        assert convert("export-hf", "--from", str(ckpt), "--to", str(out)) == 0
    else:  # once through the real entry point
        done = subprocess.run([sys.executable, "-m", "sparse_lm", "convert", "export-hf", "--from", str(ckpt),
                               "--to", str(out)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert "written as their forward set A" in done.stdout

    model, cfg, _ = load_trained_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, tie)
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie
    ids = torch.randint(0, cfg.model.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    assert ours.abs().max() > 1.0  # not a near-zero model
    assert (ours - theirs).abs().max().item() < 1e-4

    from sparse_lm.eval.cli import evaluate

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((STDLIB / "json" / "scanner.py").read_text()[:800])
    before = evaluate(str(ckpt), [str(corpus)], 32, 16, 8, None, progress=False)
    after = evaluate(str(out), [str(corpus)], 32, 16, 8, None, progress=False)
    assert after["tokens"] == before["tokens"] > 300
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-4)
    (out / "tokenizer.model").unlink()  # eval then tokenises with the HF tokenizer: same ids, same result
    assert evaluate(str(out), [str(corpus)], 32, 16, 8, None, progress=False)["perplexity"] == after["perplexity"]


def test_export_replaces_only_an_earlier_export(tmp_path, sp_model, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model, method="dense")
    out = tmp_path / "hf"
    assert convert("export-hf", "--from", str(ckpt), "--to", str(out)) == 0
    assert convert("export-hf", "--from", str(ckpt), "--to", str(out)) == 0  # an earlier export: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert convert("export-hf", "--from", str(ckpt), "--to", str(tmp_path / "mine")) == 2
    assert "not an earlier `sparse-lm convert` output" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_reshard_shard_headroom_and_rerun_over_its_output(tmp_path, sp_model, capsys):
    """A shard that overflows names the option that fixes it; `--shard-headroom` is written into
    the new checkpoint's config and the printed resume line; re-running over the untouched output
    replaces it (the step the marker records is no training progress), a later step is refused."""
    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model)
    out = tmp_path / "tp2"
    capsys.readouterr()
    assert convert("reshard", "--from", str(ckpt), "--to", str(out), "--tensor", "2", "--shard-headroom", "0") == 2
    assert "re-shard with a larger --shard-headroom (now 0.0)" in capsys.readouterr().err
    assert convert("reshard", "--from", str(ckpt), "--to", str(out), "--tensor", "2", "--shard-headroom", "0.5") == 0
    assert "--set parallel.shard_headroom=0.5 --resume" in capsys.readouterr().out
    manifest = json.loads((out / "step_00000003" / "manifest.json").read_text())
    assert manifest["config"]["parallel"]["shard_headroom"] == 0.5 and manifest["topology"]["tensor"] == 2
    assert convert("reshard", "--from", str(ckpt), "--to", str(out), "--tensor", "2", "--shard-headroom", "0.5") == 0
    (out / "step_00000009").mkdir()
    capsys.readouterr()
    assert convert("reshard", "--from", str(ckpt), "--to", str(out), "--tensor", "2") == 2
    assert "holds training progress made after the re-shard (step_00000009)" in capsys.readouterr().err


def test_a_failed_write_is_one_line_and_changes_nothing(tmp_path, sp_model):
    """The operating system refuses the export's weights (`ulimit -f`: files up to 64 KiB) and
    another `--to` lies under a regular file: one line naming --to, exit 2, no output or temporary
    left (the earlier export in the first case untouched)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model, method="dense")
    out = tmp_path / "hf"
    assert convert("export-hf", "--from", str(ckpt), "--to", str(out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "file").write_text("")
    limited = ["bash", "-c", 'ulimit -f 64 && exec "$@"', "limited", sys.executable, "-m", "sparse_lm", "convert",
               "export-hf"]
    for to, reason in ((out, "File too large"), (tmp_path / "file" / "hf", "File exists")):
        done = subprocess.run([*limited, "--from", str(ckpt), "--to", str(to)], capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith(f"sparse-lm convert: error: --to {to}: writing the export failed (")
        assert reason in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file", "hf"]


@pytest.mark.parametrize("damage, expected", [
    (lambda hf: (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:1000]),
     "transformers cannot load it"),
    (lambda hf: (hf / "sparse_lm_export.json").write_text("{"), "sparse_lm_export.json: not valid JSON"),
], ids=["truncated weights", "bad marker"])
def test_eval_on_a_damaged_export_is_one_line(tmp_path, sp_model, transformers_llama, damage, expected):
    from sparse_lm.checkpoint.hf import load_hf_for_eval
    from sparse_lm.errors import UserError

    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model, method="dense")
    assert convert("export-hf", "--from", str(ckpt), "--to", str(tmp_path / "hf")) == 0
    damage(tmp_path / "hf")
    with pytest.raises(UserError) as err:
        load_hf_for_eval(tmp_path / "hf")
    assert expected in str(err.value) and "\n" not in str(err.value), err.value


# ---------------------------------------------------------------- import
def save_dense_hf(out: Path, sp_model: Path, tie: bool = False) -> Path:
    """A randomly initialised dense HF Llama (GQA), as transformers itself saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=448, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    shutil.copyfile(sp_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def dense_hf(tmp_path_factory, sp_model, transformers_llama) -> Path:
    return save_dense_hf(tmp_path_factory.mktemp("dense") / "hf", sp_model)


@pytest.mark.parametrize("tie", [False, True])
def test_density_one_round_trip_is_identity(tmp_path, sp_model, transformers_llama, tie):
    AutoModelForCausalLM, _ = transformers_llama
    dense_hf = save_dense_hf(tmp_path / "dense", sp_model, tie)
    sparse, back = tmp_path / "sparse", tmp_path / "back"
    assert convert("import-hf", "--from-hf", str(dense_hf), "--to", str(sparse), "--density", "1.0",
                   "--exploration", "0") == 0
    assert convert("export-hf", "--from", str(sparse), "--to", str(back)) == 0
    original, returned = load_file(dense_hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)

    model, _, manifest = load_trained_model(sparse / "checkpoints")
    assert manifest["step"] == 0 and len([m for m in model.modules() if isinstance(m, SparseLinear)]) == 14
    ids = torch.randint(0, 448, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - AutoModelForCausalLM.from_pretrained(dense_hf).eval()(input_ids=ids).logits).abs().max()
    assert diff.item() < 1e-4


@pytest.mark.parametrize("block", [1, 16])
def test_import_keeps_exactly_the_top_of_each_layer(tmp_path, dense_hf, block):
    density, exploration = 0.25, 0.15
    sparse, back = tmp_path / "sparse", tmp_path / "back"
    assert convert("import-hf", "--from-hf", str(dense_hf), "--to", str(sparse), "--density", str(density),
                   "--exploration", str(exploration), "--block-size", str(block)) == 0
    dense = load_file(dense_hf / "model.safetensors")
    model, cfg, _ = load_trained_model(sparse / "checkpoints")
    assert (cfg.sparsity.method, cfg.sparsity.block, cfg.sparsity.complement) == ("topkast", block, "offload")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    for name, layer in layers.items():
        weight = dense[f"model.{name}.weight"]
        n = layer.n_blocks
        assert int(layer.forward_mask.sum()) == math.ceil(density * n)
        assert len(layer.index) == math.ceil((density + exploration) * n)
        scores = weight.abs().view(layer.block_rows, block, layer.block_cols, block).sum(dim=(1, 3)).reshape(-1)
        in_b = torch.zeros(n, dtype=torch.bool)
        in_b[layer.index.long()] = True
        in_a = torch.zeros(n, dtype=torch.bool)
        in_a[layer.index.long()[layer.forward_mask]] = True
        assert scores[in_a].min() >= scores[in_b & ~in_a].max() and scores[in_b].min() >= scores[~in_b].max()
        a_weight = layer.dense_weight(forward_only=True)
        kept = a_weight != 0
        assert int(kept.sum()) == math.ceil(density * n) * block * block
        assert torch.equal(a_weight[kept], weight[kept])  # A holds the pretrained values
        assert torch.equal(layer.complement, weight)  # offload keeps every pretrained value
    assert convert("export-hf", "--from", str(sparse), "--to", str(back)) == 0
    exported = load_file(back / "model.safetensors")
    for name, layer in layers.items():
        assert int((exported[f"model.{name}.weight"] != 0).sum()) == math.ceil(density * layer.n_blocks) * block**2
    assert torch.equal(exported["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])


def test_imported_checkpoint_restores_into_an_optimizer(tmp_path, dense_hf):
    """What `sparse-lm pretrain` does on resume: weights, zero moments, optimizer step 0."""
    from sparse_lm.checkpoint.store import load_checkpoint
    from sparse_lm.parallel.state import Topology

    sparse = tmp_path / "sparse"
    assert convert("import-hf", "--from-hf", str(dense_hf), "--to", str(sparse), "--density", "0.5",
                   "--exploration", "0.25") == 0
    cfg_text = (sparse / "config.yaml").read_text()
    assert f"out_dir: {sparse.resolve()}" in cfg_text and "resume: must" in cfg_text and "method: topkast" in cfg_text
    model = build_model(_import_config(sparse))
    optimizer = torch.optim.AdamW(model.parameters())
    topo = Topology(rank=0, world=1, tensor=1, pipeline=1, data=1, tp_rank=0, pp_rank=0, dp_rank=0,
                    device=torch.device("cpu"))
    manifest = load_checkpoint(sparse / "checkpoints", model, optimizer, topo)
    assert manifest["state"] == {"step": 0, "samples_seen": 0, "tokens_seen": 0}
    state = optimizer.state[model.layers[0].mlp.up_proj.values]
    assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_import_with_a_parallel_config_writes_a_one_process_config(tmp_path, dense_hf, capsys):
    """The import is a 1×1 checkpoint: its config.yaml and manifest say so (else the printed
    `pretrain --config` would refuse it), and the summary says how to re-shard for the layout
    --config asked for."""
    config = tmp_path / "tp2.yaml"
    config.write_text("parallel:\n  tensor: 2\n")
    out = tmp_path / "sparse"
    capsys.readouterr()
    assert convert("import-hf", "--from-hf", str(dense_hf), "--to", str(out), "--density", "0.5",
                   "--exploration", "0.25", "--config", str(config)) == 0
    assert (f"first: sparse-lm convert reshard --from {out / 'checkpoints'} --to DIR --tensor 2 --pipeline 1"
            in capsys.readouterr().out)
    assert (_import_config(out).parallel.tensor, _import_config(out).parallel.pipeline) == (1, 1)
    manifest = json.loads((out / "checkpoints" / "step_00000000" / "manifest.json").read_text())
    assert manifest["config"]["parallel"]["tensor"] == 1 and manifest["topology"]["tensor"] == 1


def _import_config(root: Path) -> RunConfig:
    from sparse_lm.config import load_config

    return load_config(root / "config.yaml")


# ---------------------------------------------------------------- errors: one line, exit 2
def _corrupt_shard(ckpt: Path) -> None:
    shard = ckpt / "step_00000003" / "model-tp00-pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


def _set_topology(ckpt: Path) -> None:
    path = ckpt / "step_00000003" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["topology"]["tensor"] = 2
    path.write_text(json.dumps(manifest))


def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


EXPORT_ERRORS = {
    "missing shard": (lambda c: (c / "step_00000003" / "model-tp00-pp00.safetensors").unlink(), ["export-hf"],
                      "model-tp00-pp00.safetensors: missing"),
    "corrupt shard": (_corrupt_shard, ["export-hf"], "sha256 does not match"),
    "topology": (_set_topology, ["export-hf"], "model-tp01-pp00.safetensors is not listed in manifest.json"),
    "reshard layout": (None, ["reshard", "--tensor", "3"], "config field parallel.tensor: expected a divisor of"),
    "tensor zero": (None, ["reshard", "--tensor", "0"], "--tensor 0 --pipeline 1: expected integers >= 1"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_ERRORS))
def test_export_errors_are_one_line(tmp_path, sp_model, capsys, case):
    damage, (action, *extra), expected = EXPORT_ERRORS[case]
    ckpt = make_checkpoint(tmp_path / "ckpt", sp_model, method="dense")
    if damage:
        damage(ckpt)
    capsys.readouterr()
    assert convert(action, "--from", str(ckpt), "--to", str(tmp_path / "hf"), *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparse-lm convert: error: ") and expected in err, err
    assert not (tmp_path / "hf").exists()


FLAG_FORMS = {
    "export": (["--from", "CKPT", "--to", "OUT", "--format", "hf"], "export-hf --from CKPT --to OUT"),
    "reshard": (["--from", "CKPT", "--to", "OUT", "--tensor", "2", "--drop-optimizer"],
                "reshard --from CKPT --to OUT --tensor 2 --drop-optimizer"),
    "import": (["--from-hf=HF", "--to", "OUT", "--density", "0.5"], "import-hf --from-hf=HF --to OUT --density 0.5"),
}


@pytest.mark.parametrize("case", sorted(FLAG_FORMS))
def test_flag_form_points_to_the_subcommand(tmp_path, capsys, case):
    """The options-only form from before the subcommands: one line with the same command as a
    subcommand, exit 2, nothing written."""
    old, new = FLAG_FORMS[case]
    capsys.readouterr()
    assert main(["convert", *old]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparse-lm convert: error: "), err
    assert f"use: sparse-lm convert {new} (subcommands: export-hf, import-hf, reshard)" in err, err


@pytest.mark.parametrize("action, option", [("export-hf", "--density"), ("export-hf", "--tensor"),
                                            ("reshard", "--density"), ("import-hf", "--shard-headroom")])
def test_subcommands_refuse_the_others_options(tmp_path, capsys, action, option):
    source = "--from-hf" if action == "import-hf" else "--from"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", action, source, str(tmp_path), "--to", str(tmp_path / "out"), option, "1"])
    assert exit_.value.code == 2 and f"unrecognized arguments: {option} 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


IMPORT_ERRORS = {
    "block size": (None, ["--block-size", "48"], "--block-size 48: does not divide hidden_size = 64"),
    "no config": (lambda h: (h / "config.json").unlink(), [], "config.json is missing"),
    "architecture": (lambda h: _edit_config(h, architectures=["MistralForCausalLM"], model_type="mistral"), [],
                     "['MistralForCausalLM'] (model_type 'mistral') is not supported"),
    "rope scaling": (lambda h: _edit_config(h, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), [],
                     "field rope_parameters"),
    "no tokenizer": (lambda h: (h / "tokenizer.model").unlink(), [], "pass the sentencepiece model with --tokenizer"),
    "no density": (None, ["--density"], "needs --density D"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_errors_are_one_line(tmp_path, dense_hf, capsys, case):
    damage, extra, expected = IMPORT_ERRORS[case]
    hf = tmp_path / "hf"
    shutil.copytree(dense_hf, hf)
    if damage:
        damage(hf)
    args = ["import-hf", "--from-hf", str(hf), "--to", str(tmp_path / "out"), "--density", "0.5",
            "--exploration", "0.25"]
    if extra == ["--density"]:
        args = args[:5] + ["--exploration", "0.25"]
    else:
        args += extra
    capsys.readouterr()
    assert convert(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_heldout_eval_of_a_directory_checks_its_tokenizer(tmp_path, sp_model, dense_hf, data_dir):
    """`eval --corpus heldout` of an HF directory with tokenizer.model: data tokenised with another
    tokenizer is refused in one line; data tokenised with its own is scored, every token after the first."""
    from sparse_lm.data.packed import PackedSplit
    from sparse_lm.data.prepare import prepare_data
    from sparse_lm.errors import UserError
    from sparse_lm.eval.cli import evaluate

    with pytest.raises(UserError, match=f"--data {data_dir}: tokenised with a different tokenizer than {dense_hf};"):
        evaluate(str(dense_hf), ["heldout"], 32, 32, 8, str(data_dir), progress=False)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("decoder.py", "encoder.py", "scanner.py", "tool.py", "__init__.py"):
        (corpus / f"{name}.txt").write_text((STDLIB / "json" / name).read_text())
    same = tmp_path / "same"
    prepare_data([str(corpus)], same, vocab_size=512, heldout_fraction=0.4, tokenizer=str(sp_model))
    result = evaluate(str(dense_hf), ["heldout"], 32, 32, 8, str(same), progress=False)
    assert result["tokens"] == PackedSplit(same, "heldout").n_tokens - 1 > 0 and math.isfinite(result["loss"])


def test_import_refuses_to_overwrite_training_progress(tmp_path, dense_hf, capsys):
    out = tmp_path / "out"
    args = ["import-hf", "--from-hf", str(dense_hf), "--to", str(out), "--density", "0.5", "--exploration", "0.25"]
    assert convert(*args) == 0
    assert convert(*args) == 0  # re-import over an untouched import: fine
    (out / "checkpoints" / "step_00000100").mkdir()
    capsys.readouterr()
    assert convert(*args) == 2
    assert "holds training progress made after the import (step_00000100)" in capsys.readouterr().err


def test_cli_error_through_a_subprocess(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparse_lm", "convert", "import-hf", "--from-hf", str(tmp_path),
                           "--to", str(tmp_path / "out"), "--density", "0.1", "--exploration", "0.1"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr == f"sparse-lm convert: error: Hugging Face directory {tmp_path}: config.json is missing\n"
