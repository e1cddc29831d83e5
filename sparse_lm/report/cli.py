"""`sparse-lm report RUN_DIR`: one figure of a run from its metrics.jsonl — loss and held-out loss
against tokens, tok/s, memory against dense, reselection churn and per-layer density — as a PNG,
or an HTML page holding it."""

from __future__ import annotations

import argparse
import base64
import html
import io
from pathlib import Path
from typing import Any

from sparse_lm.atomic import check_writable, write_bytes, write_text
from sparse_lm.errors import UserError
from sparse_lm.report.panels import panels, read_records

TITLES = {"loss": "loss", "throughput": "throughput", "memory": "memory against dense",
          "churn": "reselection churn", "density": "per-layer density"}


def draw(data: dict[str, dict[str, Any]], title: str) -> bytes:
    """The report's PNG: one panel per entry of `data` (see `panels`)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("report needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    for ax, (name, panel) in zip(axes[0], data.items()):
        ax.set_title(TITLES[name])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        series = {k: v for k, v in panel.items() if k not in ("xlabel", "ylabel", "bars")}
        if "bars" in panel:
            ax.bar(*panel["bars"], color=["tab:blue", "tab:gray"])
        for label, (xs, ys) in series.items():
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        if not any(xs for xs, _ in series.values()) and "bars" not in panel:
            ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes)
        elif series and len(series) <= 12:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Write the report; returns (its path, the numbers drawn)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.png"
    if out.suffix not in (".png", ".html"):
        raise UserError(f"--out {out}: expected a .png or .html file")
    data = panels(read_records(run_dir), str(run_dir / "metrics.jsonl"))
    check_writable(out, "--out", is_file=True)
    png = draw(data, str(run_dir))
    if out.suffix == ".png":
        write_bytes(out, png)
    else:
        image = base64.b64encode(png).decode("ascii")
        write_text(out, f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(str(run_dir))}"
                        f"</title></head>\n<body><h1>{html.escape(str(run_dir))}</h1>\n"
                        f"<img alt='run report' src='data:image/png;base64,{image}'>\n</body></html>\n")
    return out, data


def run(args: argparse.Namespace) -> int:
    out, _ = report(args.run_dir, args.out)
    print(f"report written to {out}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("report", help="plot a run's loss, throughput, memory, churn and density")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.out_dir (holding metrics.jsonl)")
    parser.add_argument("--out", default=None, help="report.png or report.html (default: RUN_DIR/report.png)")
    parser.set_defaults(func=run)
