"""Recipes: schema errors are one line naming file, line, key and fix; overrides are type-checked."""

from __future__ import annotations

import pytest
from conftest import cli, write

from posttrain.errors import UserError
from posttrain.recipe import PretrainRecipe
from posttrain.recipe_file import load_recipe

BASE = """\
stage: pretrain
model:
  config: {n_layer: 2, n_embd: 64, n_head: 2}
data:
  train: corpus.jsonl
  max_length: 64
train:
  lr: 3.0e-3
  batch_size: 8
output_dir: runs/x
"""


def error_of(tmp_path, text: str, overrides=()) -> str:
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(UserError) as e:
        load_recipe(path, list(overrides))
    return str(e.value)


def test_valid_recipe_loads_with_defaults(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", BASE))
    assert isinstance(r, PretrainRecipe)
    assert r.train.lr == 3e-3 and r.train.scheduler == "cosine" and r.seed == 0


def test_yaml_syntax_error_names_line(tmp_path):
    msg = error_of(tmp_path, BASE.replace("  lr: 3.0e-3", "  lr: [3.0e-3"))
    assert "r.yaml:" in msg and "YAML syntax error" in msg
    assert "\n" not in msg


def test_unknown_key_suggests_the_right_one_with_its_line(tmp_path):
    msg = error_of(tmp_path, BASE.replace("  lr: 3.0e-3", "  lrr: 3.0e-3"))
    assert "r.yaml:8:" in msg  # the line of `lrr`
    assert "unknown key train.lrr" in msg and "did you mean 'lr'" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = error_of(tmp_path, BASE.replace("batch_size: 8", "batch_size: eight"))
    assert "train.batch_size" in msg and "'eight'" in msg and "integer" in msg


def test_out_of_range_and_missing(tmp_path):
    assert "greater than 0" in error_of(tmp_path, BASE.replace("batch_size: 8", "batch_size: 0"))
    msg = error_of(tmp_path, BASE.replace("output_dir: runs/x\n", ""))
    assert "missing required key output_dir" in msg


def test_cross_field_rule(tmp_path):
    msg = error_of(tmp_path, BASE.replace("{n_layer: 2, n_embd: 64, n_head: 2}", "{n_layer: 2, n_embd: 64, n_head: 3}"))
    assert "divisible by n_head" in msg


def test_unknown_stage_did_you_mean(tmp_path):
    assert "did you mean 'pretrain'" in error_of(tmp_path, BASE.replace("stage: pretrain", "stage: pretrian"))


def test_overrides_are_parsed_and_type_checked(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    r = load_recipe(path, ["train.lr=1e-4", "train.max_steps=7", "logging.tensorboard=false", "seed=3"])
    assert r.train.lr == 1e-4 and r.train.max_steps == 7 and r.logging.tensorboard is False and r.seed == 3
    with pytest.raises(UserError, match="train.max_steps"):
        load_recipe(path, ["train.max_steps=many"])
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        load_recipe(path, ["train.epoch=2"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_recipe(path, ["train.lr"])


def test_cli_validate_reports_one_line_and_exit_2(tmp_path):
    bad = write(tmp_path / "bad.yaml", BASE.replace("  lr: 3.0e-3", "  lrr: 3.0e-3"))
    proc = cli("validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "did you mean 'lr'" in proc.stderr


def test_cli_validate_checks_files_exist(tmp_path):
    recipe = write(tmp_path / "r.yaml", BASE.replace("corpus.jsonl", str(tmp_path / "nope.jsonl")))
    proc = cli("validate", str(recipe))
    assert proc.returncode == 2 and "data.train" in proc.stderr and "does not exist" in proc.stderr
    write(tmp_path / "nope.jsonl", '{"text": "hi"}\n')
    proc = cli("validate", str(recipe))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_shipped_recipes_validate_schema():
    from pathlib import Path

    for path in sorted(Path("recipes").rglob("*.yaml")):
        if "accelerate" in path.parts:
            continue
        load_recipe(path)  # schema only: inputs may not exist before `make world`


def test_missing_world_data_names_the_world_recipe_that_writes_it(monkeypatch, tmp_path):
    import shutil
    from pathlib import Path

    from conftest import ROOT

    from posttrain.inputs import _world_hint

    # Recipes and their paths are relative to the directory a user runs from: the shipped world
    # recipe, plus a variant of it that writes elsewhere.
    (tmp_path / "recipes/world").mkdir(parents=True)
    shutil.copy(ROOT / "recipes/world/world.yaml", tmp_path / "recipes/world/world.yaml")
    write(tmp_path / "recipes/world/world_big.yaml", "stage: world\nworld: {people: 300}\noutput_dir: runs/world/data_big\n")
    monkeypatch.chdir(tmp_path)
    assert _world_hint(Path("runs/world/data/no_such.jsonl")) == " (run `make world` to generate the world data)"
    assert _world_hint(Path("runs/world/data")) == " (run `make world` to generate the world data)"
    assert "posttrain world recipes/world/world_big.yaml" in _world_hint(Path("runs/world/data_big/x.jsonl"))
    assert _world_hint(Path("runs/elsewhere/x.jsonl")) == ""


def test_a_finished_run_stays_finished_when_posttrain_adds_a_setting(tmp_path):
    """recipe.yaml of a run made before a setting existed lacks its key: read with today's schema it
    is the same recipe, so the stage is still done; a changed value is not."""
    import yaml

    from posttrain.runs import finished_with, recipe_yaml

    recipe = load_recipe("recipes/world/grpo.yaml", [f"output_dir={tmp_path}"])
    old = yaml.safe_load(recipe_yaml(recipe))
    del old["eval"]["prompt_field"], old["grpo"]["prompt_field"]  # as written before these keys existed
    write(tmp_path / "recipe.yaml", yaml.safe_dump(old))
    write(tmp_path / "DONE", "")
    assert finished_with(recipe)
    assert not finished_with(load_recipe("recipes/world/grpo.yaml", [f"output_dir={tmp_path}", "train.lr=1e-3"]))
    write(tmp_path / "recipe.yaml", yaml.safe_dump({**old, "grpo": {**old["grpo"], "retired_key": 1}}))
    assert not finished_with(recipe)
