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


def launcher(name: str):
    """recipes/accelerate/NAME.yaml as a test parameter; DeepSpeed's (zero*) skip where it is not installed."""
    import importlib.util

    if name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return pytest.param(name, marks=pytest.mark.skip(reason="DeepSpeed is not installed (make deepspeed)"))
    return name


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
data: {{train: {small_world}/pretrain.jsonl, max_length: 128}}
pretrain: {{probe: {small_world}/probe.jsonl}}
train: {{max_steps: 120, batch_size: 8, lr: 3.0e-3, warmup: 10, save_every: 50}}
logging: {{every: 5}}
output_dir: {out}
""")
    cli("pretrain", str(recipe), check=True)
    return out


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory, small_world, tiny_base) -> Path:
    """The tiny base after a short chat SFT: a real chat model (ChatML template, pad != EOS)."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    recipe = write(out.parent / "sft.yaml", f"""\
stage: sft
model: {{path: {tiny_base}, chat_template: {ROOT / 'data_templates' / 'chatml.jinja'}}}
data: {{train: {small_world}/sft_train.jsonl, max_length: 128}}
train: {{max_steps: 30, lr: 2.0e-3, batch_size: 8, packing: true, save_every: 100}}
logging: {{every: 5}}
output_dir: {out}
""")
    cli("sft", str(recipe), check=True)
    return out


@pytest.fixture(scope="session")
def tiny_reward(tmp_path_factory, small_world, tiny_sft) -> Path:
    out = tmp_path_factory.mktemp("reward") / "reward"
    recipe = write(out.parent / "reward.yaml", f"""\
stage: reward
model: {{path: {tiny_sft}}}
data: {{train: {small_world}/pref_train.jsonl, eval: {small_world}/pref_eval.jsonl, max_length: 128}}
reward: {{gold_pairs: 16, extra_layers: 1}}
eval: {{prompts: {small_world}/eval_prompts.jsonl, verifier: {small_world}, max_new_tokens: 16}}
train: {{max_steps: 20, lr: 1.0e-3, batch_size: 8, save_every: 100}}
logging: {{every: 5}}
output_dir: {out}
""")
    cli("reward", str(recipe), check=True)
    return out
