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
