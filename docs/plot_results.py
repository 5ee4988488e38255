"""Draw docs/images/fid_vs_budget.png from docs/results.csv: FID ratio against training images and
against training minutes, one marker per evaluation N (ratios compare only at the same N). With
--table, print the markdown table of docs/results.md instead (tests/test_docs.py checks they agree).

    uv run python docs/plot_results.py [--csv docs/results.csv] [--out docs/images/fid_vs_budget.png]
    uv run python docs/plot_results.py --table
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: a file only
import matplotlib.pyplot as plt
from matplotlib import ticker

DOCS = Path(__file__).resolve().parent
MARKERS = {"200": "o", "250": "s", "1000": "^", "2000": "D"}  # evaluation N -> marker
FIGSIZE = (12, 5.4)  # inches: two panels side by side, the legend below
X_MARGIN = (0.12, 6.0)  # log-axis room left of the first point and right of the last, for the labels
DPI = 110
LEGEND_HEIGHT = 0.11  # of the figure, below the panels
LABEL_GAP = 8.0  # points between the baselines of labels at one x: a line of 7-point text


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


TABLE_HEADER = (
    "recipe",
    "N",
    "seed",
    "images",
    "train min",
    "processor",
    "FID",
    "floor",
    "ratio",
    "class KL",
    "command",
)


def markdown_table(rows: list[dict[str, str]]) -> str:
    """docs/results.md's table: one line per CSV row, numbers as written in the CSV."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in rows:
        cells = [
            r["recipe"], f"{int(r['n']):,}", r["seed"], f"{int(r['images']):,}", r["train_minutes"] or "-",
            r["processor"], r["fid"], r["floor"], f"**{r['ratio']}**", r["class_kl"], f"`{r['command']}`",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def annotate(ax, rows: list[dict[str, str]], column: str) -> None:
    """One label per recipe, N and x, beside its point; the labels of one x stacked upwards where they
    would overlap (many recipes share a budget), each as near its point as the stack allows."""
    seen, stacks = set(), {}
    first = min(float(r[column]) for r in rows if r[column])
    for r in rows:
        key = (r["label"], r["n"], r[column])
        if r[column] and key not in seen:
            seen.add(key)
            text = r["label"] if r["n"] in ("200", "2000") else f"{r['label']}, N = {int(r['n']):,}"
            stacks.setdefault(float(r[column]), []).append((float(r["ratio"]), text))
    ax.get_ylim()  # settles the autoscaled limits that transData maps through
    points_per_pixel = 72 / ax.figure.dpi
    for x, labels in stacks.items():
        left = x == first  # the first budget's labels go left, clear of the next one's
        top = -float("inf")  # where the label below ends, in points
        for y, text in sorted(labels):
            at = ax.transData.transform((x, y))[1] * points_per_pixel
            placed = max(at, top + LABEL_GAP)
            top = placed
            ax.annotate(
                text,
                (x, y),
                fontsize=7,
                xytext=(-5 if left else 5, placed - at - 3),
                textcoords="offset points",
                ha="right" if left else "left",
            )


def draw(rows: list[dict[str, str]], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, sharey=True)
    panels = (("images", "training images"), ("train_minutes", "training minutes on 2 CPU cores"))
    for ax, (column, xlabel) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        for n, marker in MARKERS.items():
            points = [r for r in rows if r["n"] == n and r[column]]
            ax.scatter(
                [float(r[column]) for r in points],
                [float(r["ratio"]) for r in points],
                marker=marker,
                label=f"N = {int(n):,}",
                alpha=0.8,
            )
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlim(left=ax.get_xlim()[0] * X_MARGIN[0], right=ax.get_xlim()[1] * X_MARGIN[1])
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("FID / floor (1 = as good as real images)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="evaluation N", loc="lower center", ncol=len(MARKERS))  # below, clear of points
    fig.suptitle("FID ratio against training budget (docs/results.csv)")
    fig.tight_layout(rect=(0, LEGEND_HEIGHT, 1, 1))
    for ax, (column, _) in zip(axes, panels, strict=True):
        annotate(ax, rows, column)  # once the panels have about their final size: labels are spaced in points
    fig.tight_layout(rect=(0, LEGEND_HEIGHT, 1, 1))  # again, now with room for the labels past the panels
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DOCS / "results.csv")
    parser.add_argument("--out", type=Path, default=DOCS / "images" / "fid_vs_budget.png")
    parser.add_argument("--table", action="store_true", help="print the markdown table instead of drawing")
    args = parser.parse_args()
    rows = read_rows(args.csv)
    if args.table:
        sys.stdout.write(markdown_table(rows))
    else:
        draw(rows, args.out)


if __name__ == "__main__":
    main()
