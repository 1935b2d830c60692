"""Reading a recipe file: `yaml.safe_load` (a recipe never runs code), `--set a.b=value` overrides
parsed as YAML scalars, and validation against the stage's schema (posttrain/recipe.py). Every error
is one line that names the file, the line where the key can be found, the key, and a fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.errors import UserError
from posttrain.recipe import Recipe
from posttrain.stages import STAGES


def load_recipe(path: str | Path, overrides: list[str] = (), stage: str | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises UserError with a one-line message."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a recipe file (e.g. recipes/world/sft.yaml)")
    if not path.is_file():
        raise UserError(f"{path}: recipe not found; recipes live in recipes/ (e.g. recipes/world/sft.yaml)")
    raw, text = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys to values")
    for item in overrides:
        apply_override(raw, item)
    name = raw.get("stage")
    if not isinstance(name, str) or name not in STAGES:
        shown = _short(name)
        hint = did_you_mean(str(name), STAGES) if isinstance(name, str) else ""
        raise UserError(f"{path}:{_line(text, ('stage',))}: unknown stage {shown}{hint}; stages: {', '.join(STAGES)}")
    if stage is not None and name != stage:
        raise UserError(f"{path}: this is a {name!r} recipe, but `posttrain {stage}` needs stage: {stage}")
    cls = STAGES[name].recipe
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain(e, cls, path, text)) from None


# A recipe is a few dozen values; a YAML document that expands to more is an alias bomb (a few lines
# of nested anchors that expand to billions of values), refused before anything builds or prints it.
MAX_VALUES = 10_000


def read_yaml(path: Path) -> tuple[object, str]:
    """(value, text) of a YAML file read with the safe loader (no tags that build objects), refusing
    what safe_load lets through silently: bytes that are not UTF-8 text, a key given twice in one
    mapping (YAML keeps the last), and aliases that expand past MAX_VALUES values."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None
    if "\x00" in text:
        raise UserError(f"{path}: holds NUL bytes: a binary file, not YAML text")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, text
        _check_node(node, path)
        return loader.construct_document(node), text
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error: {problem}; fix the YAML at that line") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe; flatten it") from None
    finally:
        loader.dispose()


def _check_node(root: yaml.Node, path: Path) -> None:
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, active: frozenset, where: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise UserError(f"{path}:{node.start_mark.line + 1}: {where or 'the document'}: a YAML alias refers to "
                            "itself; write the value out")
        n = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                named = isinstance(key, yaml.ScalarNode) and key.value != "<<"
                if named:
                    if key.value in seen:
                        raise UserError(f"{path}:{key.start_mark.line + 1}: key {_short(key.value)} appears twice in one "
                                        f"mapping (first on line {seen[key.value]}); YAML would keep the last silently: "
                                        "remove one")
                    seen[key.value] = key.start_mark.line + 1
                name = str(key.value)[:60] if named else ""
                inner = f"{where}.{name}" if named and where else name or where
                n += size(key, active | {id(node)}, where) + size(value, active | {id(node)}, inner)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(size(item, active | {id(node)}, f"{where}[{i}]") for i, item in enumerate(node.value))
        if n > MAX_VALUES:
            raise UserError(f"{path}:{node.start_mark.line + 1}: {where or 'the document'}: YAML aliases here expand to "
                            f"more than {MAX_VALUES:,} values (an alias bomb?); write the values out")
        sizes[id(node)] = n
        return n

    size(root, frozenset(), "")


def _short(value: object, width: int = 60) -> str:
    """repr() cut to `width` characters, built without expanding a huge value first."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, width, width
    shown = r.repr(value)
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to the raw recipe dict; the value is a YAML scalar."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {item!r}: bad key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def _explain(e: ValidationError, cls: type[BaseModel], path: Path, text: str) -> str:
    errors = e.errors()
    err = errors[0]
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in err["loc"]) or "(recipe)"  # list items by index: grpo.rewards.0.source
    where = f"{path}:{_line(text, tuple(err['loc']))}"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        known = _fields_at(cls, loc[:-1])
        hint = did_you_mean(loc[-1], known) or (f"; known keys here: {', '.join(known)}" if known else "")
        return f"{where}: unknown key {key}{hint}{more}"
    if err["type"] == "missing":
        return f"{where}: missing required key {key}; add it to the recipe{more}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if err["type"] == "literal_error" and isinstance(got, str):
        msg += did_you_mean(got, re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", ""))))
    shown = f" (got {_short(got)})" if got is not None and not isinstance(got, dict) else ""
    return f"{where}: {key}: {msg}{shown}{more}"


def did_you_mean(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _fields_at(cls: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names of the (sub)section at `loc`, for did-you-mean on unknown keys."""
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _section_type(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def _line(text: str, loc: tuple) -> int:
    """The 1-based line where the deepest existing key (or list item, by index) of `loc` appears in the
    YAML text (1 if none)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return 1
    line = 1
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == part:
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line
