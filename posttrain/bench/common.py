"""What every contender shares: the bench's sizes, where the world's inputs are, the stages as users run
them, and the bare training loop that is the limit of this code path."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRL_PPO_VERSION = "1.12.0"  # the last TRL release with a PPOTrainer (trl.experimental.ppo)


@dataclass(frozen=True)
class Size:
    sft_steps: int
    reward_steps: int
    dpo_steps: int
    ppo_iterations: int
    generate_calls: int  # bare model.generate calls at the PPO rollout batch
    eval_prompts: int
    rounds: int
    ppo_seeds: int  # the PPO section's turns: one seed each, so its gold comparison has a spread


SIZES = {"full": Size(sft_steps=120, reward_steps=120, dpo_steps=60, ppo_iterations=40, generate_calls=10,
                      eval_prompts=400, rounds=2, ppo_seeds=3),
         "smoke": Size(sft_steps=4, reward_steps=4, dpo_steps=3, ppo_iterations=2, generate_calls=2, eval_prompts=16,
                       rounds=1, ppo_seeds=1)}
SECTIONS = ("sft", "reward", "dpo", "ppo", "generate", "pipeline")


@dataclass
class World:
    """Where the inputs are: the world's data and its finished base, SFT and reward runs; and where the
    TRL 1.12 environment lives (created on first use)."""

    data: str = "runs/world/data"
    base: str = "runs/world/base"
    sft: str = "runs/world/sft"
    reward: str = "runs/world/reward"
    trl_venv: str = f"runs/bench/trl-{TRL_PPO_VERSION}-venv"

    def args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]


def check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))


# --- the stages as users run them ---------------------------------------------------------------------


def stage_command(stage: str, w: World, out: Path, steps: int, seed: int | None = None) -> list[str]:
    """`posttrain STAGE recipes/world/STAGE.yaml` on `w`, for `steps` steps, with no evaluation after training
    (the bench times training; the evaluation path has its own section); `seed` replaces the recipe's."""
    # no evaluation, and no path of the recipe left pointing at runs/world (the inputs may be elsewhere)
    sets = {"output_dir": str(out), "eval.prompts": "null", "eval.verifier": "null", "eval.probe": "null"}
    if stage == "sft":
        sets |= {"model.path": w.base, "data.train": f"{w.data}/sft_train.jsonl", "data.eval": "null",
                 "train.max_steps": steps}
    elif stage in ("reward", "dpo"):
        sets |= {"model.path": w.sft, "data.train": f"{w.data}/pref_train.jsonl", "data.eval": "null",
                 "train.max_steps": steps}
        if stage == "reward":
            sets |= {"reward.gold_pairs": 0}
    elif stage == "ppo":
        sets |= {"model.path": w.sft, "data.train": f"{w.data}/ppo_prompts.jsonl", "ppo.reward_model": w.reward,
                 "ppo.verifier": w.data, "ppo.iterations": steps, "train.save_every": steps}
    if seed is not None:
        sets["seed"] = seed
    cmd = [sys.executable, "-m", "posttrain.cli", stage, f"recipes/world/{stage}.yaml", "--force"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def recipe_for(stage: str, w: World, steps: int, seed: int | None = None):
    """The recipe `stage_command` runs, as the stage reads it."""
    from posttrain.recipe_file import load_recipe

    cmd = stage_command(stage, w, Path("unused"), steps, seed)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    return load_recipe(f"recipes/world/{stage}.yaml", sets, stage=stage)


def posttrain_stage(stage: str, w: World, out: Path, steps: int, seed: int | None = None) -> dict:
    run_dir = out / f"run_{stage}"
    cmd = stage_command(stage, w, run_dir, steps, seed)
    check_call(cmd)
    shown_as = {"command": shlex.join(["posttrain", *cmd[3:]])}  # the stage as a user types it
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    if stage == "ppo":
        return _ppo_times(metrics, recipe_for("ppo", w, steps).ppo.rollout_batch_size) | shown_as
    end = next(m for m in metrics if "train_runtime" in m)
    result = {"steps": end["step"], "seconds": end["train_runtime"], "step_s": end["train_runtime"] / end["step"]}
    tokens = max((m["num_tokens"] for m in metrics if "num_tokens" in m), default=None)
    if tokens:
        result["tokens"] = tokens
        result["tokens_per_s"] = tokens / end["train_runtime"]
    for key in ("padding_fraction", "trained_token_fraction", "packing"):
        if key in summary:
            result[key] = summary[key]
    return result | shown_as


def _ppo_times(metrics: list[dict], batch: int) -> dict:
    """Seconds per iteration and per phase, from the second iteration on (the first includes warm-up)."""
    its = [m for m in metrics if "time_generate" in m]
    later = its[1:] or its
    phases = {k: statistics.mean(m[f"time_{k}"] for m in later) for k in ("generate", "score", "forward", "train")}
    return {"iterations": len(its), "iteration_s": sum(phases.values()), **{f"{k}_s": v for k, v in phases.items()},
            "generated_positions": statistics.mean(m["generated_width"] for m in later) * batch}


# --- the bare loop: the same model and batches, nothing but forward, loss, backward, AdamW ----------------


def timed_loop(model, batches, loss_fn, lr: float, beta2: float) -> float:
    """Seconds for one optimizer step per batch. AdamW is torch's fused one, as posttrain's: the bare loop
    is the best this code path can do (the unfused default costs 3-4 ms a step on a world model)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=0.0, fused=True)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start
