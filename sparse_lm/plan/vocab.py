"""The vocabulary a plan sizes the model with: the one `sparse-lm pretrain` will build.

`pretrain` takes the vocabulary from the prepared data's tokenizer (meta.json under `data.path`,
rounded up to `model.vocab_multiple`), not from `data.vocab_size`, which only tells `prepare-data`
what to train; the quick-start data has 4096 pieces where the presets say 32000. A plan from
`data.vocab_size` would answer for another model than the run trains. So where the data is
prepared, the plan reads it as `train.preflight.check_run` does, and says which source it used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sparse_lm.config import RunConfig
from sparse_lm.data.packed import META_FILE, load_meta
from sparse_lm.model import resolve_vocab


def resolve(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """(`cfg` with `model.vocab_size` resolved, {size, source, note}). A model.vocab_size below the
    data's tokenizer is the one-line error pretrain would give."""
    data = Path(cfg.data.path)
    if (data / META_FILE).is_file():
        tokenizer, source = load_meta(data)["vocab_size"], "data"
        note = f"the tokenizer of the prepared data at {data} ({tokenizer} pieces), as pretrain reads it"
    else:
        tokenizer, source = cfg.data.vocab_size, "data.vocab_size"
        note = (f"data.vocab_size ({tokenizer}): {data} holds no prepared data yet; pretrain will take "
                "the vocabulary of the tokenizer prepare-data trains there")
    if cfg.model.vocab_size:
        source, note = "model.vocab_size", "model.vocab_size, as set in the config"
    model = resolve_vocab(cfg.model, tokenizer)
    return dataclasses.replace(cfg, model=model), {"size": model.vocab_size, "source": source, "note": note}
