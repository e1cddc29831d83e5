"""results.md of a study (tools/study.py): the selected setting of every variant, its difference from
the first variant paired by seed, then each variant's slices and grid, then the long horizon. Runs
that diverged show as such."""

from __future__ import annotations

import math

import study_grid


def _pm(stat: dict, fmt: str) -> str:
    return f"{stat['mean']:{fmt}} ± {stat['sd']:{fmt}}" if stat["n"] > 1 else f"{stat['mean']:{fmt}}"


def _signed(stat: dict) -> str:
    return f"{stat['mean']:+.4f}" + (f" ± {stat['sd']:.4f}" if stat["n"] > 1 else "")


def _rates(groups: dict | None) -> str:
    """Peak rates embedding / head / hidden (a sparse run's hidden is its sparse linears')."""
    if not groups:
        return "—"
    hidden = groups.get("hidden_sparse", groups.get("hidden"))
    return " / ".join(f"{v:.3g}" if v is not None else "—" for v in (groups.get("embedding"), groups.get("head"),
                                                                       hidden))


def _num(value: float, fmt: str) -> str:
    return "diverged" if value is None or not math.isfinite(value) else f"{value:{fmt}}"


def selected_table(results: dict, horizon: dict) -> str:
    lines = ["| run | method | selected setting | seeds | forward non-zeros | tokens | train GFLOP/token | "
             "peak lr emb / head / hidden | selection loss | held-out ppl | bits/byte | on grid edge |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for name, r in results.items():
        edge = ", ".join(r.get("on_edge", [])) or "no"
        lines.append(f"| {name} | {r['method']} | {study_grid.label(r.get('setting', {}))} | {r['perplexity']['n']} | "
                     f"{r['forward_nonzeros'] / 1e6:.2f}M ({r['nonzero_fraction']:.2f}) | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['train_flops_per_token'] / 1e9:.4f} | {_rates(r.get('lr_groups'))} | "
                     f"{_pm(r['selection_losses'], '.4f')} | {_pm(r['perplexity'], '.2f')} | "
                     f"{_pm(r['bits_per_byte'], '.4f')} | {edge} |")
    text = "\n".join(lines) + "\n" + paired_table(results)
    if horizon:
        text += horizon_table(horizon)
    return text


def _extra_names(records) -> list[str]:
    """The `extra_eval` corpora that any of these runs was scored on, in config order."""
    return list(dict.fromkeys(k for r in records for k, v in (r.get("extra_eval") or {}).items() if v))


def _extra_ppl(record: dict, name: str) -> str:
    result = (record.get("extra_eval") or {}).get(name)
    return f"{result['perplexity']:.2f}" if result else "—"


def horizon_table(horizon: dict) -> str:
    """The long runs at equal tokens, and at equal training FLOPs against the first one's curve."""
    against = next(iter(horizon))
    extra = _extra_names(horizon.values())
    text = (f"\nLong horizon, one seed. Δ at equal tokens: held-out loss minus {against}'s at its end. Δ at equal "
            f"FLOPs: the last loop held-out loss minus {against}'s loop held-out loss when it had spent as many "
            f"training FLOPs (at step ≈; {against} is then mid-schedule, which flatters the other run)."
            + "".join(f" {n}: the run scored on the `extra_eval` corpus {n}, and its Δ at equal tokens." for n in extra)
            + "\n\n| long horizon | steps | tokens | train PFLOP | held-out ppl | bits/byte | selection loss | "
            f"Δ equal tokens | Δ equal FLOPs ({against} at step ≈) |" + "".join(f" {n} ppl | Δ {n} |" for n in extra)
            + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(extra) + "\n")
    for name, r in horizon.items():
        equal = r.get("equal_tokens") or {}
        tokens = f"{equal['heldout_loss']:+.4f}" if equal else "—"
        flops = r.get("equal_flops")
        at_flops = f"{flops['loop_loss_delta']:+.4f} ({flops['reference_step']:.0f})" if flops else "—"
        text += (f"| {name} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | {r['train_flops'] / 1e15:.3f} | "
                 f"{_pm(r['perplexity'], '.2f')} | {_pm(r['bits_per_byte'], '.4f')} | "
                 f"{_pm(r['selection_losses'], '.4f')} | {tokens} | {at_flops} |"
                 + "".join(f" {_extra_ppl(r, n)} | "
                           + (f"{equal[f'{n}_loss']:+.4f}" if f"{n}_loss" in equal else "—") + " |" for n in extra)
                 + "\n")
    return text


def paired_table(results: dict) -> str:
    """Each variant minus the reference at the same seed: the comparison that seed luck shared by
    both (the data order) does not blur."""
    paired = {name: r["paired"] for name, r in results.items() if r.get("paired")}
    if not paired:
        return ""
    against = next(iter(paired.values()))["against"]
    text = (f"\nPaired by seed against {against} (the same data order): this run's number minus {against}'s, "
            "mean ± sample sd over the seeds both have; negative is better.\n\n"
            "| run | seeds | Δ held-out loss (nats) | Δ selection loss (nats) | seeds with lower held-out loss |\n"
            "|---|---:|---:|---:|---:|\n")
    for name, p in paired.items():
        text += (f"| {name} | {len(p['seeds'])} | {_signed(p['heldout_loss'])} | {_signed(p['selection_loss'])} | "
                 f"{p['ahead']} of {len(p['seeds'])} |\n")
    return text


def report(results: dict, horizon: dict, runs: list[dict], fraction: float) -> str:
    text = [f"Selection: the mean training loss over the last {fraction:.0%} of the steps, at the first seed; "
            "held-out numbers are `sparse-lm eval` on the held-out split, mean ± sample sd over seeds.\n\n",
            selected_table(results, horizon)]
    sliced = [(name, r) for name, r in results.items() if len(r.get("slices", {})) > 1]
    if sliced:
        text.append("\n| run | slice | its best setting | selection loss | held-out ppl | on grid edge |\n"
                    "|---|---|---|---:|---:|---|\n")
        for name, r in sliced:
            for key, s in r["slices"].items():
                text.append(f"| {name} | {key} | {study_grid.label(s['setting'])} | "
                            f"{_num(s['selection_loss'], '.4f')} | {_num(s['perplexity'], '.2f')} | "
                            f"{', '.join(s['on_edge']) or 'no'} |\n")
    for name in dict.fromkeys(r["name"] for r in runs if r["phase"] == "grid"):
        grid = [r for r in runs if r["name"] == name and r["phase"] == "grid"]
        if len(grid) < 2:
            continue
        chosen = results.get(name, {}).get("setting")
        extra = _extra_names(grid)
        text.append(f"\n**{name}** grid ({len(grid)} runs; ★ selected)\n\n"
                    "| setting | peak lr emb / head / hidden | selection loss | held-out ppl |"
                    + "".join(f" {n} ppl |" for n in extra) + "\n|---|---|---:|---:|" + "---:|" * len(extra) + "\n")
        for r in grid:
            star = " ★" if r["setting"] == chosen else ""
            text.append(f"| {study_grid.label(r['setting'])}{star} | {_rates(r['lr_groups'])} | "
                        f"{_num(r['selection_loss'], '.4f')} | {_num(r['perplexity'], '.2f')} |"
                        + "".join(f" {_extra_ppl(r, n)} |" for n in extra) + "\n")
    return "".join(text)
