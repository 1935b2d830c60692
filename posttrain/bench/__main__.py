"""`python -m posttrain.bench`: the contenders, the turns they take, and the command line (see the
package's docstring for what each section measures)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from posttrain import bench as package
from posttrain.bench import answers, rl, stages
from posttrain.bench.common import SECTIONS, SIZES, Size, World, check_call, posttrain_stage
from posttrain.bench.report import Row, pipeline_rows, render, section_rows

# name: (w, size, out, turn) -> result; `turn` moves the seed only where a section compares quality
CONTENDERS = {
    "sft-posttrain": lambda w, s, out, k: posttrain_stage("sft", w, out, s.sft_steps),
    "sft-bare": lambda w, s, out, k: stages.sft_bare(w, s.sft_steps),
    "sft-trl": lambda w, s, out, k: stages.sft_trl(w, s.sft_steps, out),
    "reward-posttrain": lambda w, s, out, k: posttrain_stage("reward", w, out, s.reward_steps),
    "reward-bare": lambda w, s, out, k: stages.reward_bare(w, s.reward_steps),
    "reward-trl": lambda w, s, out, k: stages.reward_trl(w, s.reward_steps, out),
    "dpo-posttrain": lambda w, s, out, k: posttrain_stage("dpo", w, out, s.dpo_steps),
    "dpo-bare": lambda w, s, out, k: stages.dpo_bare(w, s.dpo_steps),
    "dpo-trl": lambda w, s, out, k: stages.dpo_trl(w, s.dpo_steps, out),
    "ppo-posttrain": lambda w, s, out, k: rl.ppo_ours(w, s.ppo_iterations, out, k),
    "ppo-trl": lambda w, s, out, k: rl.ppo_trl(w, s.ppo_iterations, out, k),
    "generate-bare": lambda w, s, out, k: rl.generate_bare(w, s.generate_calls),
    "answer-posttrain": lambda w, s, out, k: answers.answer_ours(w, s.eval_prompts),
    "answer-bare": lambda w, s, out, k: answers.answer_bare(w, s.eval_prompts),
}
ROUNDS = {  # the contenders of each section, in the order they take turns
    "sft": ["sft-posttrain", "sft-bare", "sft-trl"],
    "reward": ["reward-posttrain", "reward-bare", "reward-trl"],
    "dpo": ["dpo-posttrain", "dpo-bare", "dpo-trl"],
    "ppo": ["ppo-posttrain", "ppo-trl", "generate-bare"],
    "generate": ["answer-posttrain", "answer-bare"],
}


def one_command(name: str, size: str, w: World, out: Path, turn: int) -> list[str]:
    return [sys.executable, "-m", "posttrain.bench", "one", name, f"--size={size}", *w.args(), f"--out={out}",
            *([f"--turn={turn}"] if turn else [])]


def shown(cmd: list[str]) -> str:
    """A command as a user types it: `python` for this interpreter, default inputs left out."""
    defaults = World().args()
    return shlex.join(["python", *[a for a in cmd[1:] if a not in defaults]])


def turns(section: str, s: Size) -> int:
    """PPO takes one turn per seed (its gold is compared, and needs a spread); the others `rounds`."""
    return s.ppo_seeds if section == "ppo" else s.rounds


def bench(size: str, s: Size, w: World, out: Path, sections: list[str]) -> list[Row]:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for section in sections:
        if section == "pipeline":
            rows += pipeline_rows(w, rerun=size == "full")
            continue
        got: dict[str, list[dict]] = {n: [] for n in ROUNDS[section]}
        commands = {}
        n = turns(section, s)
        for k in range(n):
            for name in ROUNDS[section]:
                where = out / section / name / (f"turn{k}" if n > 1 else "")
                where.mkdir(parents=True, exist_ok=True)
                cmd = one_command(name, size, w, where, k if section == "ppo" else 0)
                commands[name] = shown(cmd)
                print(f"bench {section} turn {k + 1}/{n}: {name}", flush=True)
                check_call(cmd)
                got[name].append(json.loads((where / "result.json").read_text()))
                commands[name] = got[name][-1].get("command", commands[name])  # a stage: its posttrain command
        rows += section_rows(section, got, commands)
        for r in rows:
            if r.section == section and r.ratio is not None:
                print(f"  {r.what}: {r.ratio:.2f}×", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["all", "one"], default="all")
    parser.add_argument("name", nargs="?", help="with `one`: a contender, e.g. sft-bare")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--rounds", type=int, help="turns per section (default: the size's)")
    parser.add_argument("--seeds", type=int, help="PPO's turns, one seed each (default: the size's)")
    parser.add_argument("--turn", type=int, default=0, help="with `one`: the turn (PPO: the recipe's seed + turn)")
    for k, v in asdict(World()).items():
        parser.add_argument(f"--{k.replace('_', '-')}", default=v)
    a = parser.parse_args(argv)
    w = World(a.data, a.base, a.sft, a.reward, a.trl_venv)
    out = Path(a.out)
    if a.mode == "one":
        if a.name not in CONTENDERS:
            parser.error(f"unknown contender {a.name!r}; one of {', '.join(CONTENDERS)}")
        out.mkdir(parents=True, exist_ok=True)
        result = CONTENDERS[a.name](w, SIZES[a.size], out, a.turn)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return 0
    for d in (w.sft, w.reward):
        if not (Path(d) / "DONE").exists():
            print(f"bench: {d} is not a finished run; run `make pipeline` first (or point --sft/--reward elsewhere)",
                  file=sys.stderr)
            return 2
    sections = a.only.split(",") if a.only else list(SECTIONS)
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    import torch

    started = time.time()
    size = SIZES[a.size]
    size = replace(size, rounds=a.rounds or size.rounds, ppo_seeds=a.seeds or size.ppo_seeds)
    rows = bench(a.size, size, w, out, sections)
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "size": a.size, "rounds": size.rounds, "ppo_seeds": size.ppo_seeds,
            "threads": torch.get_num_threads(), "cpu": f"{os.cpu_count()} CPU cores", "seconds": time.time() - started}
    (out / "bench.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
    text = render(rows, info)
    (out / "bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
