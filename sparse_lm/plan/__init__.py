"""`sparse-lm plan`: memory per rank and FLOPs per token of a run, predicted from its config."""
