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

The same comparison also runs with recipes/accelerate/fsdp.yaml (FSDP2: each process holds half the
weights, gradients and optimizer state; the same tolerance holds, since sharding changes only which
process sums what), and as two launches of recipes/accelerate/multinode.yaml, one process each, as on
two machines.

Each stage takes 20-40 s (two launches of two processes each), so these are slow tests:
`make test-slow` or `pytest -m slow tests/test_processes.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_processes", ROOT / "scripts" / "compare_processes.py")
compare_processes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_processes)

RTOL = 1e-4
STEPS = 12  # optimizer steps per run (PPO: 4 iterations of 2 epochs)


@pytest.fixture(scope="module")
def inputs(small_world, tiny_base, tiny_sft, tiny_reward) -> dict:
    return {"world": small_world, "base": tiny_base, "sft": tiny_sft, "reward": tiny_reward}


@pytest.mark.slow
@pytest.mark.parametrize("stage", compare_processes.STAGES)
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


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_two_machines_match_one_process(stage, inputs, tmp_path):
    """recipes/accelerate/multinode.yaml as two hosts of one process each (two `accelerate launch`
    calls with --machine_rank 0 and 1 meeting at 127.0.0.1) trains like one process with the global batch."""
    result = compare_processes.compare_stage(stage, inputs, tmp_path, processes=2, batch=4, steps=STEPS, machines=2)
    print(compare_processes.table(result))
    for key, curve in result["keys"].items():
        assert curve["max_rel_diff"] <= RTOL, f"{stage} {key}: {curve}"
    two = tmp_path / stage / "2proc_2machines"
    assert (two / "DONE").exists()
    assert result["same_files"] and result["metrics_lines"][0] == result["metrics_lines"][1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "classify", "reward", "dpo"])
def test_fsdp_on_two_processes_matches_one(stage, inputs, tmp_path):
    """recipes/accelerate/fsdp.yaml (FSDP2, each block and the root sharded over 2 processes on gloo)
    trains like one process with the global batch; each process holds half the training state; rank 0
    writes an ordinary model directory that loads and computes what the one-process model does."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    result = compare_processes.compare_stage(stage, inputs, tmp_path, processes=2, batch=4, steps=8, accel="fsdp")
    print(compare_processes.table(result))
    for key, curve in result["keys"].items():
        assert curve["max_rel_diff"] <= RTOL, f"{stage} {key}: {curve}"
    one, two = (Path(result["runs"][n]) for n in (1, 2))
    assert (two / "DONE").exists() and not (two / ".gathered").exists()
    # the same files, but for the checkpoints' format (FSDP's optimizer and model shards)
    def files(d):
        return [f for f in compare_processes.outputs(d) if not f.startswith("checkpoints/")]
    assert files(one) == files(two) and result["metrics_lines"][0] == result["metrics_lines"][1]
    held = {n: json.loads((d / "summary.json").read_text())["training_state_bytes"] for n, d in ((1, one), (2, two))}
    assert held[2]["processes"] == 2 and held[2]["total"] <= 0.55 * held[1]["total"], held
    cls = AutoModelForSequenceClassification if stage in ("classify", "reward") else AutoModelForCausalLM
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (cls.from_pretrained(str(d))(input_ids=ids).logits for d in (one, two))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
