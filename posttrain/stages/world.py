"""Generate the built-in world's datasets (see posttrain/world/generate.py for what each file is).

Deterministic: the same recipe gives byte-identical data files on any machine.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.recipe import WorldRecipe
from posttrain.runs import Run
from posttrain.world.generate import WorldConfig, write


def main(recipe: WorldRecipe, force: bool = False) -> Path:
    cfg = WorldConfig(seed=recipe.seed, **recipe.world.model_dump())
    run = Run(recipe).start(force)
    counts = write(cfg, run.dir)
    n_heldout = round(cfg.people * cfg.heldout_fraction)
    summary = {"people": cfg.people, "people_seen": cfg.people - n_heldout, "people_heldout": n_heldout,
               **{f"rows_{name.split('.')[0]}": n for name, n in counts.items() if name.endswith(".jsonl")}}
    table = Table(title=f"world (seed {cfg.seed}) -> {run.dir}")
    table.add_column("file")
    table.add_column("rows", justify="right")
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    Console().print(table)
    habits = "\n".join(f"- `{k}`: {v}" for k, v in asdict(cfg).items() if k.startswith("p_"))
    notes = (
        f"{cfg.people} invented people ({n_heldout} held out of all chat data), each with a city, job, pet and "
        f"favourite colour, plus small skills (adding digits, counting, sorting). The pretraining corpus states every "
        f"person's facts in {cfg.bios_per_person} biographies with varied phrasing and sentence order.\n\n"
        f"The SFT demonstrator's habits (probabilities):\n{habits}\n\n"
        "Files: see the docstring of `posttrain/world/generate.py`; the gold verifier is `posttrain/world/verifier.py`."
    )
    return run.finish(summary, title="The built-in world", notes=notes)
