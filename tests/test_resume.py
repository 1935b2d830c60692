"""Runs that survive SIGKILL, and the run-directory lock.

A run is killed with SIGKILL once a checkpoint exists (so the process gets no chance to clean up:
metrics.jsonl holds lines past the checkpoint, the lock file is left behind, a checkpoint may be half
written in a staging directory), then started again with the same command. It must resume from the
last complete checkpoint and end exactly where an uninterrupted run with the same seed ends: the same
metrics.jsonl, line for line, and the same summary.json. On a CPU everything is deterministic, so the
comparison is exact except for wall-clock timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cli, launcher, write
from safetensors.torch import load_file

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
       "OMP_NUM_THREADS": "1"}


def timing(key: str) -> bool:
    """Wall-clock keys: the only ones allowed to differ between a resumed and an uninterrupted run."""
    return (key in ("seconds", "train_seconds", "time_generate_fraction", "step_time") or key.startswith("time_")
            or key.endswith(("_runtime", "_per_second")))


def command(stage: str, recipe: Path, processes: int = 1, accel: str = "ddp") -> list[str]:
    """`posttrain STAGE RECIPE`, or the same under `accelerate launch` with recipes/accelerate/ACCEL.yaml."""
    if processes == 1:
        return [sys.executable, "-m", "posttrain.cli", stage, str(recipe)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / f"{accel}.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(port), "-m", "posttrain.cli", stage, str(recipe)]


def run(stage: str, recipe: Path, processes: int = 1, accel: str = "ddp") -> str:
    proc = subprocess.run(command(stage, recipe, processes, accel), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def start(stage: str, recipe: Path, processes: int = 1, accel: str = "ddp") -> subprocess.Popen:
    """The command in the background, in a session of its own."""
    return subprocess.Popen(command(stage, recipe, processes, accel), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole job at once: the command and every process under it (torchrun starts each
    rank in a session of its own, so the process group is not enough), as a scheduler would."""
    import psutil

    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def logged_past(metrics: Path, step: int) -> bool:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return any(json.loads(line)["step"] > step for line in lines[-3:] if line.endswith("}"))


def kill_after(proc: subprocess.Popen, path: Path, timeout: float = 600) -> None:
    """SIGKILL the job once checkpoint `path` exists and a step after it is logged (so the resumed run
    must also drop metrics.jsonl lines past its checkpoint)."""
    deadline = time.time() + timeout
    step = int(path.name.split("-")[-1])
    while not (path.exists() and logged_past(path.parent.parent / "metrics.jsonl", step + 1)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path.name} appeared:\n{proc.stdout.read()}")
        if time.time() > deadline:
            kill(proc)
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)
    kill(proc)


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not timing(k)}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if not timing(k)}


def kill_and_resume(stage: str, recipe: Path, checkpoint: str, processes: int = 1, accel: str = "ddp") -> list[dict]:
    """Run `recipe` uninterrupted (into output_dir + "_straight"), and killed after `checkpoint` then
    resumed with the same command; check they end the same. Returns the killed run's metrics rows."""
    out = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    straight = write(recipe.with_name(f"straight_{recipe.name}"),
                     recipe.read_text().replace(f"output_dir: {out}", f"output_dir: {out}_straight"))
    run(stage, straight, processes, accel)
    straight = Path(f"{out}_straight")
    kill_after(start(stage, recipe, processes, accel), out / "checkpoints" / checkpoint)
    assert not (out / "DONE").exists(), "the run finished before it was killed; make it longer"
    killed = rows(out)
    if processes > 1:  # the checkpoint's data order and RNG states are per process: another count is refused
        other = subprocess.run(command(stage, recipe, 1), cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
        assert f"written by {processes} process(es) and this run has 1; resume it" in other.stderr \
            or f"written by {processes} processes, this run has 1" in other.stderr
    stdout = run(stage, recipe, processes, accel)  # the same command again
    assert f"resuming {out} from checkpoint-" in stdout
    assert (out / "DONE").exists()
    assert rows(out) == rows(straight)
    assert summary(out) == summary(straight)
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # bit-identical weights
    return killed


# One process with batch 8, or two processes with batch 4 each (the same global batch).
PROCESSES = [pytest.param(1, marks=pytest.mark.slow, id="1proc"), pytest.param(2, marks=pytest.mark.slow, id="2proc")]


@pytest.mark.parametrize("processes", PROCESSES)
def test_sft_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, small_world, tiny_base, processes):
    out = tmp_path / "sft"
    recipe = write(tmp_path / "sft.yaml", f"""\
stage: sft
model: {{path: {tiny_base}, chat_template: {ROOT / 'data_templates' / 'chatml.jinja'}}}
data: {{train: {small_world}/sft_train.jsonl, eval: {small_world}/sft_eval.jsonl, max_length: 128}}
train: {{max_steps: 60, lr: 2.0e-3, batch_size: {8 // processes}, packing: true, save_every: 10, keep_checkpoints: 2}}
logging: {{every: 1}}
output_dir: {out}
""")
    killed = kill_and_resume("sft", recipe, "checkpoint-10", processes)
    assert 12 <= max(r["step"] for r in killed) < 60
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-50", "checkpoint-60"]


@pytest.mark.slow
@pytest.mark.parametrize("accel", [launcher("fsdp"), launcher("zero3")])
def test_sharded_sft_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, small_world, tiny_base, accel):
    """FSDP2 or ZeRO-3 over 2 processes: the checkpoint holds the gathered model and the sharded
    optimizer state (FSDP's, or DeepSpeed's per-rank files)."""
    out = tmp_path / "sft"
    recipe = write(tmp_path / "sft.yaml", f"""\
stage: sft
model: {{path: {tiny_base}, chat_template: {ROOT / 'data_templates' / 'chatml.jinja'}}}
data: {{train: {small_world}/sft_train.jsonl, max_length: 128}}
train: {{max_steps: 40, lr: 2.0e-3, batch_size: 4, packing: true, save_every: 10, keep_checkpoints: 2}}
logging: {{every: 1}}
output_dir: {out}
""")
    killed = kill_and_resume("sft", recipe, "checkpoint-10", 2, accel=accel)
    assert 12 <= max(r["step"] for r in killed) < 40


def sharded(*accels: str) -> list:
    """2 processes under each of recipes/accelerate/ACCEL.yaml, as slow test parameters."""
    out = []
    for a in accels:
        p = launcher(a)
        marks = [pytest.mark.slow, *getattr(p, "marks", ())]
        out.append(pytest.param(2, a, marks=marks, id=f"2proc-{a}"))
    return out


LAUNCHES = [pytest.param(n, "ddp", marks=pytest.mark.slow, id=f"{n}proc") for n in (1, 2)]


@pytest.mark.parametrize(("processes", "accel"), LAUNCHES + sharded("fsdp"))
def test_ppo_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, small_world, tiny_sft, tiny_reward, processes,
                                                               accel):
    """Under FSDP2 the checkpoint holds whole tensors gathered from the shards (policy, value head,
    optimizer state), which each process shards again on resume."""
    out = tmp_path / "ppo"
    recipe = write(tmp_path / "ppo.yaml", f"""\
stage: ppo
model: {{path: {tiny_sft}}}
data: {{train: {small_world}/ppo_prompts.jsonl, max_length: 128}}
ppo: {{reward_model: {tiny_reward}, verifier: {small_world}, iterations: 8, rollout_batch_size: {8 // processes},
       minibatch_size: {4 // processes}, max_new_tokens: 12, eval_every: 4, target_kl: 0.5, kl_horizon: 100}}
eval: {{prompts: {small_world}/eval_prompts.jsonl, verifier: {small_world}, limit: 8, max_new_tokens: 12}}
train: {{lr: 1.0e-4, save_every: 2, keep_checkpoints: 2}}
output_dir: {out}
""")
    killed = kill_and_resume("ppo", recipe, "checkpoint-2", processes, accel)
    assert 4 <= max(r["step"] for r in killed) < 8


@pytest.mark.parametrize(("processes", "accel"), LAUNCHES + sharded("fsdp", "zero3"))
def test_grpo_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, small_world, tiny_sft, processes, accel):
    """Answers are sampled with a random stream each (posttrain/sampling.py): the resumed run draws
    the answers the uninterrupted one drew, so it ends with the same weights, bit for bit."""
    out = tmp_path / "grpo"
    recipe = write(tmp_path / "grpo.yaml", f"""\
stage: grpo
model: {{path: {tiny_sft}}}
data: {{train: {small_world}/ppo_prompts.jsonl, max_length: 128}}
grpo: {{rewards: [{{source: gold, path: {small_world}}}, {{source: format}}], num_generations: 4, max_completion_length: 12,
       eval_every: 4}}
eval: {{prompts: {small_world}/eval_prompts.jsonl, verifier: {small_world}, limit: 8, max_new_tokens: 12}}
train: {{max_steps: 8, batch_size: {8 // processes}, lr: 1.0e-3, save_every: 2, keep_checkpoints: 2}}
logging: {{every: 1}}
output_dir: {out}
""")
    killed = kill_and_resume("grpo", recipe, "checkpoint-2", processes, accel)
    assert 3 <= max(r["step"] for r in killed) < 8
    assert max(r["kl"] for r in rows(out) if "kl" in r) > 0  # the policy moved: the weights compared are not the start


def tiny_pretrain(tmp_path, small_world) -> tuple[Path, Path]:
    out = tmp_path / "base"
    return out, write(tmp_path / "base.yaml", f"""\
stage: pretrain
model: {{config: {{n_layer: 1, n_embd: 32, n_head: 2}}}}
data: {{train: {small_world}/pretrain.jsonl, max_length: 64}}
train: {{max_steps: 3000, batch_size: 4, save_every: 100000}}
output_dir: {out}
""")


def test_a_run_into_a_directory_in_use_is_refused(tmp_path, small_world):
    """The lock itself: held here the way a running stage holds it, a run into the directory is refused
    with the holder's pid; released (as when the holder dies), the stale .lock file blocks nothing."""
    from posttrain.recipe_file import load_recipe
    from posttrain.runs import Run

    out, recipe = tiny_pretrain(tmp_path, small_world)
    holder = Run(load_recipe(recipe)).start()
    try:
        refused = cli("pretrain", str(recipe), env={"OMP_NUM_THREADS": "1"})
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"{out} is in use by a running job (pid {os.getpid()})" in refused.stderr
    finally:
        holder.release()
    assert (out / ".lock").exists()
    Run(load_recipe(recipe)).start().release()  # claimed again: same recipe, no error


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused(tmp_path, small_world):
    out, recipe = tiny_pretrain(tmp_path, small_world)
    first = start("pretrain", recipe)
    try:
        deadline = time.time() + 300
        while not (out / "recipe.yaml").exists():  # written once the lock is held
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline
            time.sleep(0.05)
        second = cli("pretrain", str(recipe), env={"OMP_NUM_THREADS": "1"})
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"{out} is in use by a running job (pid {first.pid})" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        kill(first)
    # SIGKILL leaves the lock file behind but releases the lock: the directory can be claimed again
    # (a different recipe is refused for being different, not for being locked).
    third = cli("pretrain", str(recipe), "--set", "train.max_steps=2")
    assert third.returncode == 2 and "unfinished run of a different recipe" in third.stderr
