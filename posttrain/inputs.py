"""What a recipe reads must be there before a stage starts: every input path exists (or is a Hub
name), and every run directory it names is finished. `posttrain validate` and every stage call
`check_inputs` before anything heavy is imported.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.recipe import Recipe
from posttrain.runs import require_done

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(value: str) -> bool:
    """A hub model or dataset name ("gpt2", "openai-community/gpt2", or a dataset with its split,
    "trl-lib/Capybara:test", as data.load reads it), as opposed to a local path."""
    if Path(value).exists() or value.startswith(("runs/", "./", "../", "/", "~")):
        return False
    name, colon, split = value.partition(":")
    if colon and not re.fullmatch(r"[\w.\-\[\]%:+]+", split):
        return False
    return bool(_HUB_ID.match(name)) and not name.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pt", ".yaml"))


def check_inputs(recipe: Recipe, offline: bool = False) -> list[str]:
    """Check that every input path exists (and every run directory is finished). Returns notes;
    raises UserError on the first problem."""
    notes = []
    for key, value in recipe.paths().items():
        p = Path(value)
        if p.exists():
            require_done(p, key)
            continue
        if is_hub_id(value):
            notes.append(f"{key}: {value} is a Hugging Face Hub name" + (" (not checked offline)" if offline else ""))
            continue
        raise UserError(f"{key}: {value} does not exist{_world_hint(p)}")
    return notes


def _world_hint(missing: Path) -> str:
    """How to create a missing path that a shipped world recipe writes (its output_dir or a file in it)."""
    for path in sorted(Path("recipes/world").glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if not (isinstance(doc, dict) and doc.get("stage") == "world" and doc.get("output_dir")):
            continue
        out = Path(doc["output_dir"])
        if missing == out or out in missing.parents:
            command = "make world" if path.name == "world.yaml" else f"posttrain world {path}"
            return f" (run `{command}` to generate the world data)"
    return ""
