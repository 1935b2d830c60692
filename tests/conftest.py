"""Shared fixtures: a small world generated once per session, and a helper to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def cli(*args: str, cwd: Path | None = None, check: bool = False, input: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `posttrain ARGS` as a user would, from `cwd` (default: the repository root)."""
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *args], cwd=cwd or ROOT, capture_output=True, text=True,
        input=input, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=1800,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"posttrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A 24-person world (same generator as the default one, fewer people)."""
    out = tmp_path_factory.mktemp("world") / "data"
    recipe = write(out.parent / "world.yaml", f"stage: world\nworld: {{people: 24, bios_per_person: 4, skill_docs: 40}}\noutput_dir: {out}\n")
    cli("world", str(recipe), check=True)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, small_world) -> Path:
    """A tiny GPT-2 pretrained on the small world for a few steps: a real checkpoint to fine-tune."""
    out = tmp_path_factory.mktemp("base") / "base"
    recipe = write(out.parent / "base.yaml", f"""\
stage: pretrain
model: {{config: {{n_layer: 2, n_embd: 64, n_head: 2}}}}
data: {{train: {small_world}/pretrain.jsonl, max_length: 64}}
pretrain: {{probe: {small_world}/probe.jsonl}}
train: {{max_steps: 120, batch_size: 8, lr: 3.0e-3, warmup: 10, save_every: 50}}
logging: {{every: 5}}
output_dir: {out}
""")
    cli("pretrain", str(recipe), check=True)
    return out
