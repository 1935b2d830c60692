"""The stage registry (posttrain/stages/__init__.py) is the one list of stages: every entry has its
module, its schema and its world recipe, and the CLI and the Makefile agree with it."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from posttrain.cli import build_parser
from posttrain.recipe_file import load_recipe
from posttrain.stages import STAGES

MAKEFILE = (ROOT / "Makefile").read_text()


def make_target(stage: str) -> str:
    return Path(STAGES[stage].world_recipe).stem  # pretrain's world recipe is base.yaml: `make base`


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_is_a_module_a_schema_and_a_world_recipe(name):
    stage = STAGES[name]
    module = importlib.import_module(stage.module)
    assert callable(module.main)
    assert stage.recipe.model_fields["stage"].annotation.__args__ == (name,)
    recipe = load_recipe(ROOT / stage.world_recipe, stage=name)
    assert type(recipe) is stage.recipe
    assert all(need in STAGES for need in stage.needs)


def test_the_cli_has_a_command_per_stage():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(STAGES) <= set(sub.choices)
    for name, stage in STAGES.items():
        assert sub.choices[name].description == stage.description


def _closure(deps: dict[str, set[str]], node: str) -> set[str]:
    out: set[str] = set()
    todo = list(deps.get(node, ()))
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += deps.get(n, ())
    return out


def test_the_makefile_runs_each_stage_after_what_it_needs():
    prereqs = {}
    for name in STAGES:
        target = make_target(name)
        command = "$(PT)" if name == "world" else "$(LAUNCH)"
        assert f"\t{command} {name} $(call recipe,{target})" in MAKEFILE, f"make {target} does not run {name}"
        rule = re.search(rf"^{target}: (.*)$", MAKEFILE, re.M)
        assert rule is not None, f"no make target {target}"
        called = re.search(r"\$\(call needs,([^)]*)\)", rule.group(1))
        prereqs[target] = set(called.group(1).split()) - {"setup"} if called else set()
    needed = {make_target(n): {make_target(x) for x in s.needs} for n, s in STAGES.items()}
    for target in prereqs:
        assert _closure(prereqs, target) == _closure(needed, target), target


def test_make_help_names_every_stage():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in STAGES:
        assert re.search(rf"\b{make_target(name)}\b", out), name


def test_the_registry_imports_no_torch():
    """`posttrain --help` and a finished stage's skip read the registry: it must stay light."""
    code = "import sys, posttrain.stages, posttrain.recipe_file, posttrain.inputs; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
