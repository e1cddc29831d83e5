"""`sparse-lm generate`: greedy decoding through the sparse kernels gives transformers' `generate`
tokens on the exported model, the KV cache reproduces full recomputation, a seed fixes the sampled
text, and bad input is one line with exit status 2."""

from __future__ import annotations

import pytest
import torch

from sparse_lm.checkpoint.hf import write_fresh_checkpoint
from sparse_lm.cli import main
from sparse_lm.data.tokenizer import Tokenizer
from sparse_lm.generate.cache import new_cache
from sparse_lm.generate.cli import load_generator
from sparse_lm.generate.sampling import Sampling, filtered_logits
from sparse_lm.model.build import build_model
from tests.test_hf import _run_config, make_checkpoint, sp_model  # noqa: F401 (sp_model is a fixture)

CPU = torch.device("cpu")
PROMPT = "def encode(self, o):\n    "


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sp_model):  # noqa: F811
    """(sparse_lm checkpoint, its Hugging Face export) of a model with logits of a few units."""
    root = tmp_path_factory.mktemp("gen")
    ckpt = make_checkpoint(root / "ckpt", sp_model)
    assert main(["convert", "export-hf", "--from", str(ckpt), "--to", str(root / "hf")]) == 0
    return ckpt, root / "hf"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, sp_model):  # noqa: F811
    """A checkpoint straight from initialisation: near-uniform logits, so sampling has choices."""
    cfg = _run_config(Tokenizer(sp_model).vocab_size)
    root = tmp_path_factory.mktemp("fresh") / "ckpt"
    write_fresh_checkpoint(root, build_model(cfg), cfg, sp_model, step=0)
    return root


def generate(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_equals_transformers_generate(exported):
    from transformers import AutoModelForCausalLM

    ckpt, hf_dir = exported
    ours = load_generator(str(ckpt), CPU)
    new, _ = ours.generate(PROMPT, 24, Sampling(temperature=0))
    from_hf_dir, _ = load_generator(str(hf_dir), CPU).generate(PROMPT, 24, Sampling(temperature=0))

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = ours.prompt_ids(PROMPT)
    padding = list(range(ours.tokenizer.vocab_size, hf.config.vocab_size))  # ids no token has
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, suppress_tokens=padding,
                             pad_token_id=ours.tokenizer.eos_id)[0, len(prompt):].tolist()
    assert len(set(theirs)) > 3  # not one token repeated
    assert new == theirs
    assert from_hf_dir == theirs


class Recording:
    """A decoder that keeps every logits vector it returns."""

    def __init__(self, decoder):
        self.decoder, self.logits = decoder, []

    def start(self, ids):
        self.logits.append(self.decoder.start(ids))
        return self.logits[-1]

    def next(self, token):
        self.logits.append(self.decoder.next(token))
        return self.logits[-1]


@pytest.mark.parametrize("which", ["sparse_lm", "hf"])
def test_kv_cache_equals_recomputation(exported, which):
    path = str(exported[0] if which == "sparse_lm" else exported[1])
    runs = []
    for use_cache in (True, False):
        generator = load_generator(path, CPU, use_cache)
        generator.decoder = Recording(generator.decoder)
        new, _ = generator.generate(PROMPT, 40, Sampling(temperature=1.0, seed=3))
        runs.append((new, torch.stack(generator.decoder.logits)))
    (cached, cached_logits), (recomputed, recomputed_logits) = runs
    assert len(cached) > 10 and cached == recomputed
    assert cached_logits.abs().max() > 1.0
    assert torch.allclose(cached_logits, recomputed_logits, atol=1e-4, rtol=0)


def test_cache_in_chunks_equals_one_pass(exported):
    """Several positions at once after a filled cache (the masked path) give the full pass's logits."""
    from sparse_lm.checkpoint.model_io import load_trained_model

    model, cfg, _ = load_trained_model(exported[0])
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = new_cache(cfg.model.n_layers, 40)
    with torch.no_grad():
        whole = model.logits(ids)
        parts = [model.logits(ids[:, a:b], cache=cache) for a, b in ((0, 17), (17, 18), (18, 40))]
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-4, rtol=0)


def test_sampling_is_reproducible_per_seed(fresh, capsys):
    def sample(*extra: str) -> str:
        code, out, err = generate(["--checkpoint", str(fresh), "--prompt", PROMPT, "--max-new-tokens", "30",
                                   "--device", "cpu", *extra], capsys)
        assert code == 0, err
        assert out.startswith(PROMPT) and "tokens in" in err
        return out

    first = sample("--seed", "5")
    assert sample("--seed", "5") == first
    assert sample("--seed", "6") != first
    greedy = sample("--temperature", "0")
    assert sample("--top-k", "1", "--seed", "7") == greedy == sample("--top-p", "1e-6", "--seed", "8")


def test_filters_keep_the_top_tokens():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    probs = torch.softmax(logits, dim=-1)  # ranked 1, 3, 2, 0, 4

    def kept(top_k: int, top_p: float) -> list[int]:
        return torch.isfinite(filtered_logits(logits, top_k, top_p)).nonzero().flatten().tolist()

    assert kept(2, 1.0) == [1, 3]
    assert kept(0, float(probs[1])) == [1]  # the top token alone reaches top_p
    assert kept(0, float(probs[1] + probs[3]) + 1e-3) == [1, 2, 3]
    assert kept(0, 1.0) == kept(5, 1.0) == [0, 1, 2, 3, 4]


def test_generation_stops_at_the_context(fresh, capsys):
    generator = load_generator(str(fresh), CPU)
    prompt = next(p for p in ("x = 1\n" * n for n in range(40, 0, -1))
                  if 0 < generator.context - len(generator.prompt_ids(p)) < 20)
    room = generator.context - len(generator.prompt_ids(prompt))
    code, _, err = generate(["--checkpoint", str(fresh), "--prompt", prompt, "--max-new-tokens", "30",
                               "--device", "cpu", "--seed", "1"], capsys)
    assert code == 0 and f"{room} tokens in" in err and "stopped at the model's context" in err, err


@pytest.mark.parametrize("args, expected", [
    (["--prompt", "x = [1, 2]\n" * 40], "--prompt: "),
    (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: expected a number in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1: expected an integer >= 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: expected a number >= 0"),
    (["--temperature", "nan"], "--temperature nan: expected a number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
    (["--device", "tpu"], "--device tpu: expected cpu"),
])
def test_bad_input_is_one_line(exported, capsys, args, expected):
    ckpt, _ = exported
    base = {"--prompt": "x", "--device": "cpu"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, out, err = generate(["--checkpoint", str(ckpt), *[x for kv in base.items() for x in kv]], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err, err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    code, _, err = generate(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "nothing") in err, err
