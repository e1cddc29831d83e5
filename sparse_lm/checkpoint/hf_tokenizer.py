"""Our sentencepiece .model as a Hugging Face fast tokenizer (`tokenizer.json`) with the same ids.

Why not transformers' own converter: it needs protobuf to read the .model (not a dependency here),
and transformers 5's `LlamaTokenizer` rebuilds a Metaspace pre-tokenizer that prepends "▁" (a
dummy prefix), which our tokenizer does not have. Building the BPE from `SentencePieceProcessor`
is short and exact for the settings `data/tokenizer.py` trains with:

* vocabulary: every piece at its sentencepiece id (unknown, control and byte pieces included);
* merges: every split of a normal piece into two normal pieces, ranked by the merged piece's
  score — sentencepiece BPE merges the adjacent pair whose concatenation is the best-scoring
  piece (leftmost on ties), HF BPE the pair with the best-ranked merge (leftmost on ties);
* normalizer: " " → "▁" only (identity normalisation, no dummy prefix, whitespace runs kept);
* pre-tokenizer: sentencepiece's word split — a word is a run of "▁" and the non-"▁" text after
  it (with allow_whitespace_only_pieces a run of spaces stays in one word);
* byte fallback: a character outside the vocabulary becomes its UTF-8 byte pieces <0xXX>;
* no BOS/EOS added: sentencepiece's `encode` adds none (training appends EOS per document).

Two differences remain, both outside `encode`'s ids for ordinary text and both documented in
docs/guide/convert.md: the raw `tokenizers.Tokenizer` matches the literal strings "<unk>", "<s>", "</s>" in text as
special tokens (sentencepiece spells them out; `tokenizer_config.json` sets
`split_special_tokens: true`, so transformers' tokenizer spells them out too), and `decode` prints
control tokens unless `skip_special_tokens=True` (sentencepiece drops them).

`check_same_ids` runs both tokenizers on probe texts; a sentencepiece model this conversion cannot
reproduce (a unigram model, or one trained with a dummy prefix or NFKC normalisation, e.g. imported
with `--from-hf`) raises `TokenizerMismatch`, and the export then ships tokenizer.model alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from sparse_lm.errors import UserError

SPACE = "\u2581"  # sentencepiece's whitespace symbol "▁"

# Texts where a wrong conversion shows: whitespace runs and edges, code, digits, control and
# literal special-token strings, non-BMP characters (byte fallback), characters NFKC would change.
PROBES = [
    "a", " a", "a ", "  ", "   x  =  1   ", "\tdef f(x):\n        return x  # done\n\n\n",
    "if __name__ == \"__main__\":\n    main()\n", "12345 67.890e-12 0x1F", "<s> </s> <unk> <0x41>",
    "😀🎉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎 漢字 café é", "ﬁ ① Ａ \u00a0 \u3000 \u2581x", "\r\n\x00\x7f", "",
]


def build_hf_tokenizer(sp_model: Path):
    """A `tokenizers.Tokenizer` reproducing the sentencepiece BPE model's ids (see module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {sp.id_to_piece(i): i for i in range(n) if not (sp.is_byte(i) or i in special)}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-sp.get_score(i), i, cut, (left, right)))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=False))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    return tok, sp


class TokenizerMismatch(UserError):
    """The converted tokenizer would give other ids than the sentencepiece model."""


def check_same_ids(sp, tok, texts: list[str], where: Path) -> None:
    """Raise TokenizerMismatch naming the first text on which the two tokenizers disagree."""
    for text, ours, theirs in zip(texts, sp.encode(texts), tok.encode_batch(texts, add_special_tokens=False)):
        if theirs.ids != ours:
            raise TokenizerMismatch(
                f"tokenizer {where}: the Hugging Face conversion gives other ids than sentencepiece on {text[:40]!r} "
                "(it reproduces BPE models trained with sparse_lm's settings: byte fallback, identity "
                "normalisation, no dummy prefix)"
            )


def probe_texts(sp) -> list[str]:
    """PROBES plus every piece's surface text, alone and all joined (exercises every merge)."""
    pieces = [sp.id_to_piece(i).replace(SPACE, " ") for i in range(sp.get_piece_size())
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    return PROBES + pieces + ["".join(pieces), " ".join(pieces)]


def write_hf_tokenizer(sp_model: Path, directory: Path, model_max_length: int) -> dict[str, int | None]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the
    bos/eos/unk ids (None where the model has no such piece)."""
    tok, sp = build_hf_tokenizer(sp_model)
    tok.encode_special_tokens = True  # what `split_special_tokens: true` makes transformers do
    check_same_ids(sp, tok, probe_texts(sp), sp_model)
    tok.save(str(directory / "tokenizer.json"))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    specials = {f"{k}_token": sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
    config = {
        # Not "LlamaTokenizer": in transformers 5 it would replace our pre-tokenizer by one that
        # prepends "▁". The generic fast class loads tokenizer.json as written (4.x and 5.x).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return {k: (i if i >= 0 else None) for k, i in ids.items()}
