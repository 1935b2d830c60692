"""What a recipe reads must be there before a stage starts, and what it asks for must fit: every input
path exists (or is a Hub name that can be reached), every run directory it names is finished, and the
numbers that depend on the model or the machine (LoRA rank, context length, pretraining's memory) are
within bounds. `posttrain validate` and every stage call `check_inputs` before anything heavy loads.
"""

from __future__ import annotations

import json
import os
import re
import socket
from functools import cache
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.recipe import Recipe
from posttrain.runs import require_done

# GPT-2's tokenizer under its Hub names, served from packaged files (gpt2_tokenizer.py): never the Hub
GPT2_NAMES = ("gpt2", "openai-community/gpt2")
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
    """Check every input path and the bounds that depend on the model and the machine. Returns notes;
    raises UserError on the first problem. `offline`: Hub names are only noted, not looked up."""
    notes = []
    for key, value in recipe.paths().items():
        p = Path(value)
        if p.exists():
            require_done(p, key)
            _check_file(key, p)
            continue
        if key == "pretrain.tokenizer.path" and value in GPT2_NAMES:
            continue  # GPT-2's tokenizer ships with posttrain's dependencies (gpt2_tokenizer.py): no Hub
        if is_hub_id(value) and not _partly_local(p):
            notes.append(_hub_name(key, value, offline))
            continue
        raise UserError(f"{key}: {value} does not exist{_world_hint(p)}")
    check_fits(recipe)
    return notes


def _check_file(key: str, p: Path) -> None:
    """What a file must be for its key, read before anything is written: a chat template is a Jinja
    template over `messages` (not a data file), a nanoGPT checkpoint a weights-only pickle."""
    if key == "model.chat_template":
        from posttrain.templates import read_template

        read_template(str(p))
    elif key == "model.path" and p.is_file() and p.suffix == ".pt":
        from posttrain.pickles import load_weights_only

        fix = "give a nanoGPT checkpoint: torch.save({'model': model.state_dict(), 'model_args': dict(...)})"
        raw = load_weights_only(p, key, fix)
        if not isinstance(raw, dict) or "model" not in raw or "model_args" not in raw:
            raise UserError(f"{key}: {p} is not a nanoGPT checkpoint (no 'model' and 'model_args'); {fix}")


def _partly_local(p: Path) -> bool:
    """x/y where the folder x exists here: a mistyped local path, not a Hub id."""
    return len(p.parts) > 1 and Path(p.parts[0]).is_dir()


def _hub_name(key: str, value: str, offline: bool) -> str:
    """A Hub name that is not a local path. Without a connection to the Hub it is refused at once (the
    Hub client would retry for tens of seconds) unless the name is in the local cache, which then loads
    without the network."""
    if offline:
        return f"{key}: {value} is a Hugging Face Hub name (not checked offline)"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable():
        if not _in_hub_cache(value.partition(":")[0]):
            raise UserError(f"{key}: {value}: no such file or directory here, and the Hugging Face Hub cannot be "
                            "reached to look it up as a Hub name; give a local path (or connect to the network)")
        os.environ["HF_HUB_OFFLINE"] = "1"  # read from the cache, no retries against an unreachable Hub
        return f"{key}: {value} is a Hugging Face Hub name, loaded from the local cache (the Hub is out of reach)"
    return f"{key}: {value} is a Hugging Face Hub name"


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within `timeout` seconds."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    folder = name.replace("/", "--")
    return any((hub / f"{kind}--{folder}").is_dir() for kind in ("models", "datasets")) or \
        (home / "datasets" / name.replace("/", "___")).is_dir()


def read_model_config(path: str | Path) -> dict | None:
    """config.json of a local model directory (a LoRA run's: its base's), or None where there is none
    to read here (a Hub name, a nanoGPT .pt)."""
    p = Path(path)
    adapter = p / "adapter_config.json"
    if adapter.is_file():
        config = read_json(adapter)
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        return read_model_config(base) if base and Path(base).is_dir() and Path(base) != p else None
    config = p / "config.json"
    if not config.is_file():
        return None
    cfg = read_json(config)
    if not isinstance(cfg, dict):
        raise UserError(f"{config}: a model config is a JSON object; use the config.json saved with the weights")
    return cfg


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{path}{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else 'not UTF-8'}); "
                        "restore the file saved with the model") from None


def check_fits(recipe: Recipe) -> None:
    """Bounds that depend on the model or on this machine, checked before anything loads."""
    model, data, train = getattr(recipe, "model", None), getattr(recipe, "data", None), getattr(recipe, "train", None)
    cfg = read_model_config(model.path) if model is not None and model.path else None
    if cfg:
        width = cfg.get("n_embd") or cfg.get("hidden_size") or cfg.get("d_model")
        context = cfg.get("n_positions") or cfg.get("max_position_embeddings")
        if model.lora is not None and isinstance(width, int) and model.lora.r > width:
            raise UserError(f"model.lora.r: {model.lora.r} is more than the model's width ({width}); a LoRA rank is at "
                            "most the layer width, and 8-64 is usual")
        if data is not None and isinstance(context, int) and data.max_length > context:
            raise UserError(f"data.max_length: {data.max_length} is longer than the model's context ({context} positions); "
                            f"set it to at most {context}")
    if recipe.stage == "pretrain" and train is not None and train.max_steps:
        # pretraining builds its block index in memory: at least 16 bytes per token (ids and labels)
        tokens = train.max_steps * train.batch_size * train.grad_accum * data.max_length
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if tokens * 16 > memory:
            raise UserError(f"train.max_steps: {train.max_steps:,} steps of {train.batch_size} x {train.grad_accum} blocks of "
                            f"{data.max_length} tokens need more than this machine's {memory / 2**30:.0f} GiB of memory "
                            "just to index; lower train.max_steps")


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
