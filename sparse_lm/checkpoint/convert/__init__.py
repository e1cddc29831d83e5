"""`sparse-lm convert ACTION`: move a checkpoint between formats and layouts, one subcommand each:
`export-hf` (checkpoint → Hugging Face Llama), `import-hf` (dense Hugging Face Llama → sparse
checkpoint) and `reshard` (checkpoint → another tensor × pipeline layout)."""

from __future__ import annotations

from sparse_lm.checkpoint.convert import export_hf, import_hf, reshard

# Options that only a re-shard takes: in the flag form they chose it over an export.
_RESHARD_FLAGS = ("--tensor", "--pipeline", "--drop-optimizer", "--shard-headroom")


def flag_form_pointer(argv: list[str]) -> str | None:
    """For `sparse-lm convert --from ...` (options without a subcommand, the form before there were
    subcommands): one line naming the subcommand form of the same command; None for anything else."""
    if argv[:1] != ["convert"] or len(argv) < 2 or not argv[1].startswith("--") or argv[1] == "--help":
        return None
    args = argv[1:]
    flags = {a.partition("=")[0] for a in args}
    action = "import-hf" if "--from-hf" in flags else "reshard" if flags & set(_RESHARD_FLAGS) else "export-hf"
    new: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--format" or (i and args[i - 1] == "--format") or arg.startswith("--format="):
            continue  # export-hf is the format
        new.append(arg)
    return (f"options without a subcommand are no longer accepted; use: sparse-lm convert {action} {' '.join(new)} "
            "(subcommands: export-hf, import-hf, reshard)")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="export a checkpoint to Hugging Face, import a Hugging Face "
                                   "Llama as sparse, or re-shard a checkpoint for another tensor/pipeline layout")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export_hf.register(actions)
    import_hf.register(actions)
    reshard.register(actions)
