"""Rendering a `posttrain compare` report (the dict posttrain/compare.py writes to metrics.json):
report.md, a self-contained report.html, and the tables printed on the terminal. Nothing is measured here.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from posttrain.metrics import COMPARE_ROWS


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _interval(w: dict) -> str:
    return f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]"


def _blocks(rep: dict) -> list[tuple]:
    """The report as a list of blocks, rendered to Markdown and to HTML:
    ("h1"|"h2"|"h3"|"p", text), ("table", header, rows), ("img", path, caption). "**x**" marks a best value."""
    names = list(rep["models"])
    head = (f"{rep['n_prompts']} prompts from `{rep['prompts']}` (suite `{rep['suite']}`), {len(names)} models; "
            f"greedy answers and {rep['samples']} sampled answer(s) per prompt at temperature 1 (seed {rep['seed']}), "
            f"at most {rep['max_new_tokens']} new tokens.")
    if rep["ref"]:
        head += f" KL is measured against `{rep['ref']}`."
    if rep["reward"]:
        head += f" Reward model: `{rep['reward']}`."
    out: list[tuple] = [("h1", "Model comparison"), ("p", head)]
    out += [("p", f"Note: {n}.") for n in rep["notes"]]
    out.append(("table", ["model", "run", "stage", "chat template"],
                [[n, f"`{i['path']}`", i["stage"] or "-", "yes" if i["chat_template"] else "no"] for n, i in rep["models"].items()]))
    out += [("h2", "Metrics"), ("p", "Greedy answers unless the row says sampled. Bold: the best value where higher "
                                     "or lower is clearly better.")]
    rows = []
    for key, (_, direction, what) in COMPARE_ROWS.items():
        values = [rep["metrics"][n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        known = [v for v in values if v is not None]
        # Bold only where the models differ and the direction is clear (not length, diversity or KL).
        best = (max if direction > 0 else min)(known) if direction and len(set(known)) > 1 else None
        rows.append([key, *[f"**{_fmt(v)}**" if best is not None and v == best else _fmt(v) for v in values], what])
    out.append(("table", ["metric", *names, "what it measures"], rows))
    if rep["win_rates"] and len(names) > 1:
        out += [("h2", "Win rates"), ("p", "How often the first model's greedy answer beats the second's on the same prompt "
                                           "(ties count half), with a 95% Wilson interval.")]
        kinds = list(rep["win_rates"])
        pairs = rep["win_rates"][kinds[0]]
        out.append(("table", ["model", "vs", *[f"by {'gold verifier' if k == 'gold' else 'reward model'}" for k in kinds], "n"],
                    [[w["a"], w["b"], *[_interval(rep["win_rates"][k][j]) for k in kinds], str(w["n"])]
                     for j, w in enumerate(pairs)]))
    for name, p in rep.get("ppo", {}).items():
        verdict = ("**reward hacking flagged** at iteration "
                   f"{p['reward_hacking_iteration']}: {p['reward_hacking_reason']}" if p["reward_hacking"]
                   else "no reward hacking flagged" if p["reward_hacking"] is False else "not monitored (needs both a reward model and the verifier)")
        out += [("h2", f"{p.get('stage', 'PPO')} run `{name}`: proxy vs gold"), ("p", f"Reward: {p['reward'] or '-'}; {verdict}.")]
        if p["plot"]:
            out.append(("img", p["plot"], f"{name}: proxy and gold reward per iteration"))
    out.append(("h2", "Plots"))
    out += [("img", p, Path(p).stem) for p in rep["plots"]]
    out += [("h2", "Side-by-side examples"), ("p", "The prompts where the models differ most, from several prompt kinds.")]
    for j, ex in enumerate(rep["examples"], 1):
        out.append(("h3", f"{j}. {ex['kind'] or 'prompt'}: {ex['prompt']}"))
        cols = ["model", "answer"] + [c for c in ("gold", "reward") if any(a[c] is not None for a in ex["answers"].values())]
        out.append(("table", cols, [[n, a["text"] + ("" if a["stopped"] else " [...no stop]"), *[_fmt(a[c]) for c in cols[2:]]]
                                    for n, a in ex["answers"].items()]))
    return out


def _markdown(blocks: list[tuple]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " \u23ce ")

    lines = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + cell(b[1]), ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
        else:
            lines += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]] + [""]
    return "\n".join(lines)


CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f0f3f7}td{white-space:pre-wrap}tr:nth-child(even) td{background:#fafafa}
code{background:#f3f3f3;padding:0 3px}img{max-width:100%;border:1px solid #ddd}h2{margin-top:1.6em}
figure{display:inline-block;vertical-align:top;margin:.4em 1em .4em 0}figcaption{color:#666;font-size:13px}"""


def markdown(report: dict) -> str:
    """report.md."""
    return _markdown(_blocks(report))


def html_page(report: dict, root: Path) -> str:
    """report.html: self-contained (inline CSS, the plots under `root` embedded as base64 PNG, nothing
    fetched from anywhere)."""
    return _html(_blocks(report), root)


def _html(blocks: list[tuple], root: Path) -> str:
    def inline(s: str, whole: bool = False) -> str:
        # In table cells only a whole-cell **bold** or `code` is markup: answers are shown as written.
        s = html.escape(s)
        s = re.sub(r"^\*\*(.+)\*\*$" if whole else r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"^`([^`]+)`$" if whole else r"`([^`]+)`", r"<code>\1</code>", s)

    body = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3", "p"):
            body.append(f"<{b[0]}>{inline(b[1])}</{b[0]}>")
        elif b[0] == "img":
            data = base64.b64encode((root / b[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        else:
            head = "".join(f"<th>{inline(c)}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{inline(c, whole=True)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Model comparison</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def print_tables(rep: dict) -> None:
    """The metrics table (one column per model) and the win rates, on the terminal."""
    from rich.console import Console
    from rich.table import Column, Table

    names, console = list(rep["metrics"]), Console()
    table = Table("metric", *[Column(n, justify="right") for n in names],
                  title=f"compare: {rep['n_prompts']} prompts from {rep['prompts']}")
    for key in COMPARE_ROWS:
        if any(key in rep["metrics"][n] for n in names):
            table.add_row(key, *[_fmt(rep["metrics"][n].get(key)) for n in names])
    console.print(table)
    for kind, pairs in rep["win_rates"].items():
        if pairs:
            wins = Table("model", "vs", "win rate [95% CI]", title=f"by {'gold verifier' if kind == 'gold' else 'reward model'}")
            for w in pairs:
                wins.add_row(w["a"], w["b"], _interval(w))
            console.print(wins)
    for note in rep["notes"]:
        console.print(f"note: {note}")
