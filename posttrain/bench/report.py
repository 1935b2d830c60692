"""The bench's rows: a ratio per measure (medians over turns taken side by side), the goal it is held to,
the command that reproduces each contender, and the markdown report."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.bench.common import TRL_PPO_VERSION, World, check_call


@dataclass
class Row:
    section: str
    what: str
    ours: float | None
    theirs: float | None
    unit: str
    ratio: float | None = None  # ours / theirs as a speed (>1: posttrain is faster)
    goal: str = ""
    met: bool | None = None
    command: str = ""
    note: str = ""
    runs: dict = field(default_factory=dict)


def _speed_ratio(ours: float | None, theirs: float | None, higher_is_faster: bool) -> float | None:
    if not ours or not theirs:
        return None
    return ours / theirs if higher_is_faster else theirs / ours


def _median(results: list[dict], key: str) -> float | None:
    xs = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def gold_spread(results: list[dict]) -> dict:
    """Mean, range and standard error of the gold scores of one contender's seeds. With one seed the
    standard error is a proportion's worst case over the eval prompts (sampling noise of the eval only)."""
    golds = [r["gold"] for r in results]
    mean = statistics.mean(golds)
    se = statistics.stdev(golds) / len(golds) ** 0.5 if len(golds) > 1 else (0.25 / results[0]["prompts"]) ** 0.5
    text = f"{mean:.3f}" + (f" (range {min(golds):.3f}-{max(golds):.3f} over {len(golds)} seeds)" if len(golds) > 1 else "")
    return {"mean": mean, "se": se, "golds": golds, "text": text}


def gold_equal(ours: dict, theirs: dict) -> bool:
    """posttrain's mean gold is not below the other's by more than 2 standard errors of the difference."""
    return ours["mean"] >= theirs["mean"] - 2 * (ours["se"] ** 2 + theirs["se"] ** 2) ** 0.5


def section_rows(section: str, got: dict[str, list[dict]], commands: dict[str, str]) -> list[Row]:
    m = {name: {k: _median(rs, k) for k in rs[0] if isinstance(rs[0][k], (int, float))} for name, rs in got.items()}
    rows: list[Row] = []
    if section == "sft":
        ours = m["sft-posttrain"]
        for base, goal, need in (("sft-bare", "≥ 0.95× the bare loop", 0.95), ("sft-trl", "ahead of TRL's defaults", 1.0)):
            ratio = _speed_ratio(ours["tokens_per_s"], m[base]["tokens_per_s"], True)
            rows.append(Row("sft", f"training tokens/s vs {base.split('-')[1]}", ours["tokens_per_s"],
                            m[base]["tokens_per_s"], "tokens/s", ratio, goal, ratio is not None and ratio >= need,
                            f"{commands['sft-posttrain']}  vs  {commands[base]}"))
        rows.append(Row("sft", "padding fraction / trained-token fraction", ours.get("padding_fraction"),
                        ours.get("trained_token_fraction"), "fraction",
                        note="posttrain's packed batches: share of padding, share of tokens the loss trains on"))
    elif section in ("reward", "dpo"):
        ours = m[f"{section}-posttrain"]
        for base in ("bare", "trl"):
            theirs = m[f"{section}-{base}"]
            rows.append(Row(section, f"seconds per step vs {base}", ours["step_s"], theirs["step_s"], "s/step",
                            _speed_ratio(ours["step_s"], theirs["step_s"], False),
                            command=f"{commands[f'{section}-posttrain']}  vs  {commands[f'{section}-{base}']}"))
    elif section == "ppo":
        ours, trl = m["ppo-posttrain"], m["ppo-trl"]
        ratio = _speed_ratio(ours["iteration_s"], trl["iteration_s"], False)
        gold = {n: gold_spread(got[n]) for n in ("ppo-posttrain", "ppo-trl")}
        equal = gold_equal(gold["ppo-posttrain"], gold["ppo-trl"])
        rows.append(Row("ppo", f"seconds per iteration vs TRL {TRL_PPO_VERSION} PPOTrainer", ours["iteration_s"],
                        trl["iteration_s"], "s/iteration", ratio, "≤ 0.5× TRL's, equal gold",
                        ratio is not None and ratio >= 2.0 and equal,
                        f"{commands['ppo-posttrain']}  vs  {commands['ppo-trl']}",
                        note=f"gold after {int(ours['iterations'])} iterations (greedy, {got['ppo-trl'][0]['prompts']} "
                             f"eval prompts; seeds {', '.join(str(r['seed']) for r in got['ppo-trl'])}): posttrain "
                             f"{gold['ppo-posttrain']['text']}, TRL {gold['ppo-trl']['text']}"
                             f"{'' if equal else ' (posttrain lower by more than 2 standard errors)'}; per iteration, "
                             f"posttrain's phases: generate {ours['generate_s']:.2f} s, score {ours['score_s']:.2f} s, "
                             f"log-probs and values {ours['forward_s']:.2f} s, optimise {ours['train_s']:.2f} s"))
        rows.append(Row("ppo", f"gold after {int(ours['iterations'])} iterations, mean over seeds vs TRL",
                        gold["ppo-posttrain"]["mean"], gold["ppo-trl"]["mean"], "gold", goal="equal (within 2 SE)",
                        met=equal, note=f"posttrain {gold['ppo-posttrain']['golds']}, TRL {gold['ppo-trl']['golds']}"))
        ours_tps = ours["generated_positions"] / ours["generate_s"] if ours["generate_s"] else None
        bare = m["generate-bare"]["tokens_per_s"]
        ratio = _speed_ratio(ours_tps, bare, True)
        rows.append(Row("ppo", "rollout generation tokens/s vs bare model.generate", ours_tps, bare, "tokens/s", ratio,
                        "≥ 0.9×", ratio is not None and ratio >= 0.9,
                        f"{commands['ppo-posttrain']}  vs  {commands['generate-bare']}"))
    elif section == "generate":
        ours, bare = m["answer-posttrain"]["answers_per_s"], m["answer-bare"]["answers_per_s"]
        ratio = _speed_ratio(ours, bare, True)
        rows.append(Row("generate", "evaluation answers/s vs bare batched generate", ours, bare, "answers/s", ratio,
                        "≥ 0.9×", ratio is not None and ratio >= 0.9,
                        f"{commands['answer-posttrain']}  vs  {commands['answer-bare']}",
                        note="greedy, the compare suite's batch size and max_new_tokens; posttrain sorts prompts by length"))
    for row in rows:
        row.runs = {n: got[n] for n in got}
    return rows


def pipeline_rows(w: World, rerun: bool) -> list[Row]:
    world = Path(w.sft).parent
    stages = ["base", "sft", "classify", "reward", "dpo", "ppo"]
    seconds = {}
    for s in stages:
        summary = world / s / "summary.json"
        if (world / s / "DONE").exists() and summary.exists():
            seconds[s] = json.loads(summary.read_text()).get("seconds")
    rows = []
    if seconds:
        total = sum(v for v in seconds.values() if v)
        detail = ", ".join(f"{s} {v:.0f} s" for s, v in seconds.items() if v)
        rows.append(Row("pipeline", "stage seconds of the finished pipeline runs", total, None, "s",
                        note=f"{detail} (from each run's summary.json; taken when those runs ran, not in this bench)"))
    if rerun and len(seconds) == len(stages) and (world / "compare" / "DONE").exists():
        start = time.perf_counter()
        check_call(["make", "pipeline"])
        took = time.perf_counter() - start
        rows.append(Row("pipeline", "a second `make pipeline` on finished runs", took, None, "s", goal="≤ 30 s",
                        met=took <= 30, command="make pipeline"))
    elif rerun:
        rows.append(Row("pipeline", "a second `make pipeline` on finished runs", None, None, "s", goal="≤ 30 s",
                        note=f"not measured: {world} holds no finished pipeline (run `make pipeline` first)"))
    return rows


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(rows: list[Row], info: dict) -> str:
    lines = ["# posttrain bench", "",
             f"{info['date']}, size `{info['size']}`, {info['rounds']} round(s) per section "
             f"(PPO: {info.get('ppo_seeds', 1)}, one seed each), torch threads "
             f"{info['threads']}, {info['cpu']}. Ratios are speeds (>1: posttrain faster), medians over rounds "
             "taken side by side in this run; absolute figures only as context.", "",
             "| section | measure | posttrain | baseline | unit | ratio | goal | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.section} | {r.what} | {_fmt(r.ours)} | {_fmt(r.theirs)} | {r.unit} | "
                     f"{'' if r.ratio is None else f'{r.ratio:.2f}×'} | {r.goal} | {met} |")
    lines += ["", "## Notes and commands", ""]
    for r in rows:
        if r.note or r.command:
            lines.append(f"- **{r.section}, {r.what}**: {r.note}" + (f"\n  `{r.command}`" if r.command else ""))
    return "\n".join(lines) + "\n"
