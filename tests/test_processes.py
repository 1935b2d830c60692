"""Every stage as a real 2-process data-parallel run on this CPU (accelerate launch with
recipes/accelerate/ddp.yaml; the processes talk over gloo), against one process with the same global
batch (4 x 2 processes vs 8 x 1), by scripts/compare_processes.py.

Tolerance. The two runs see the same examples in the same order from the same weights and seed, and
compute the same global-batch mean loss and gradient; they differ only in the order of floating-point
sums (each process sums its half, then gloo sums the halves; padding widths follow the per-process
batch). In fp32 that is ~1e-7 relative per operation, and 20 Adam steps carry it to ~1e-6 (measured:
at most 1.5e-6 relative over every stage). A real fault is orders of magnitude larger: a loss scaled
by the process count (what the Trainer did to classification before posttrain undid it) is 100%, a
model wrapped twice by DDP or shards that overlap 1e-2..1e-1 within a few steps. RTOL = 1e-4 sits between.

Each stage takes 20-40 s (two launches of two processes each), so these are slow tests:
`make test-slow` or `pytest -m slow tests/test_processes.py`.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_processes", ROOT / "scripts" / "compare_processes.py")
compare_processes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_processes)

RTOL = 1e-4
STEPS = 12  # optimizer steps per run (PPO: 4 iterations of 2 epochs)


@pytest.fixture(scope="module")
def inputs(small_world, tiny_base, tiny_sft, tiny_reward) -> dict:
    return {"world": small_world, "base": tiny_base, "sft": tiny_sft, "reward": tiny_reward}


# GRPO: both runs draw the same answers (posttrain/sampling.py) and log the same rewards and loss up to
# and including the first step with a learning signal, but that step's gradient differs (grad norm
# 1.148 vs 1.054 with loss_type dr_grpo, 1.297 vs 1.191 with dapo, at the same loss 0.172 / 0.194),
# so the curves part from the second update on. The gradient comes out of TRL's GRPOTrainer under DDP;
# the cause is not found yet. Strict: the test fails once they agree, so this mark is removed then.
GRPO_DIFFERS = pytest.mark.xfail(strict=True, reason="GRPO under 2 processes: the first update's gradient differs from 1 process")
STAGES = [pytest.param(s, marks=GRPO_DIFFERS) if s == "grpo" else s for s in compare_processes.STAGES]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_match_one_with_the_same_global_batch(stage, inputs, tmp_path):
    result = compare_processes.compare_stage(stage, inputs, tmp_path, processes=2, batch=4, steps=STEPS)
    print(compare_processes.table(result))
    for key, curve in result["keys"].items():
        assert len(curve["steps"]) == (STEPS if stage != "ppo" else STEPS // 3), key
        assert curve["max_rel_diff"] <= RTOL, f"{stage} {key}: {curve}"
    if stage == "grpo":  # the answers differ, so there was something to learn and compare
        assert len(set(result["keys"]["reward"]["one"])) > 1 and max(result["keys"]["kl"]["one"]) > 0
    two = tmp_path / stage / "2proc"
    assert (two / "DONE").exists() and json.loads((two / "summary.json").read_text())
    # only rank 0 wrote: the same files as one process (and no metrics line twice)
    assert result["same_files"], (compare_processes.outputs(tmp_path / stage / "1proc"), compare_processes.outputs(two))
    assert result["metrics_lines"][0] == result["metrics_lines"][1]
