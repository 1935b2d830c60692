"""PNG plots written into run directories (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(rows: list[dict], keys: list[str], path: Path, title: str, ylabel: str = "") -> Path | None:
    """One line per metric key over `step`, from metrics.jsonl rows. Skips keys that never appear."""
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, label=k, marker="o" if len(xs) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bars(values: dict[str, float], path: Path, title: str, ylabel: str = "", ylim: tuple | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(values) + 2), 4))
    ax.bar(list(values), list(values.values()), color="#4C72B0")
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> Path:
    """A confusion matrix heat map with counts in the cells (rows: true class, columns: predicted)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    top = max(max(row) for row in matrix) or 1
    for t in range(n):
        for p in range(n):
            ax.text(p, t, str(matrix[t][p]), ha="center", va="center", color="white" if matrix[t][p] > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histogram(groups: dict[str, list[float]], path: Path, title: str, xlabel: str = "") -> Path:
    """Overlaid histograms of several score lists on shared bins."""
    values = [v for vs in groups.values() for v in vs]
    lo, hi = min(values), max(values)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, vs in groups.items():
        ax.hist(vs, bins=bins, alpha=0.55, label=f"{name} (n={len(vs)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(table: dict[str, dict[str, float]], keys: list[str], path: Path, title: str,
                 ylim: tuple | None = None) -> Path | None:
    """One group of bars per metric key, one bar per model (`table[model][key]`), e.g. the compare
    report's rates side by side. Keys no model has are left out; None if none is left."""
    keys = [k for k in keys if any(k in row for row in table.values())]
    if not keys:
        return None
    models = list(table)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) * max(1, len(models) / 3) + 2), 4.5))
    for m, name in enumerate(models):
        xs = [i + (m - (len(models) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [table[name].get(k, 0.0) for k in keys], width, label=name)
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
