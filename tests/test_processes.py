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
weights, gradients and optimizer state), zero2.yaml and zero3.yaml (DeepSpeed's CPU accelerator;
skipped where DeepSpeed is not installed: `make deepspeed`), with LoRA and gradient checkpointing
too; the same tolerance holds, since sharding changes only which process sums what. And as two
launches of recipes/accelerate/multinode.yaml, one process each, as on two machines.

Each stage takes 20-40 s (two launches of two processes each), so these are slow tests:
`make test-slow` or `pytest -m slow tests/test_processes.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launcher

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


SHARDED_STAGES = ["pretrain", "sft", "classify", "reward", "dpo", "grpo"]


@pytest.mark.slow
@pytest.mark.parametrize(("accel", "stage"), [(launcher(a), s) for a in ("fsdp", "zero2", "zero3") for s in SHARDED_STAGES]
                         + [("fsdp", "ppo")])  # our PPO loop shards with FSDP2 only (sharding.check_stage)
def test_sharded_training_on_two_processes_matches_one(accel, stage, inputs, tmp_path):
    """recipes/accelerate/fsdp.yaml (FSDP2, each block and the root sharded over 2 processes on gloo),
    zero2.yaml and zero3.yaml (DeepSpeed's CPU accelerator) train like one process with the global
    batch; under FSDP each process holds half the training state; rank 0 writes an ordinary model
    directory that computes what the one-process model does. PPO and GRPO generate with the policy's
    weights gathered once per rollout (sharding.whole_weights)."""
    result = compare_processes.compare_stage(stage, inputs, tmp_path, processes=2, batch=4, steps=8 if stage != "ppo" else 12,
                                             accel=accel)
    one, two = check_sharded(result, stage)
    if accel == "fsdp":
        held = {n: json.loads((d / "summary.json").read_text())["training_state_bytes"] for n, d in ((1, one), (2, two))}
        assert held[2]["processes"] == 2, held
        assert held[2]["total"] <= 0.55 * held[1]["total"], held
        if stage == "ppo":  # every model PPO holds is sharded: the frozen reference and reward model too
            for key in ("params", "grads", "optimizer", "reference", "reward_model"):
                assert held[2][key] <= 0.55 * held[1][key], (key, held)


# LoRA: dropout off, since each process draws its own dropout masks (the runs would differ by design).
# SFT starts from the SFT model, whose tokenizer has the template's tokens: new token rows on GPT-2's
# tied embeddings are refused under FSDP2 (tests/test_launch.py).
LORA = "model.lora={r: 8, dropout: 0}"
VARIANTS = {"sft-lora": ("sft", (LORA, "model.path={sft}")), "classify-lora": ("classify", (LORA, "classify.trainable=lora")),
            "reward-lora": ("reward", (LORA,)), "dpo-lora": ("dpo", (LORA,)), "ppo-lora": ("ppo", (LORA,)),
            "grpo-lora": ("grpo", (LORA,)),
            "sft-gradient-checkpointing": ("sft", ("model.gradient_checkpointing=true",)),
            "dpo-gradient-checkpointing": ("dpo", ("model.gradient_checkpointing=true",))}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("accel", [launcher("fsdp"), launcher("zero3")])
def test_sharded_lora_and_gradient_checkpointing_match_one_process(accel, variant, inputs, tmp_path):
    """LoRA (the adapter, and for classify and reward the merged model too) and gradient checkpointing
    under FSDP2 and ZeRO-3: the same losses and the same saved weights as one process. Under FSDP2 a
    LoRA model is cut as finely as a full one (each decoder block its own unit)."""
    stage, overrides = VARIANTS[variant]
    if stage == "ppo" and accel != "fsdp":
        pytest.skip("our PPO loop shards with FSDP2 only (sharding.check_stage)")
    overrides = tuple(o.replace("{sft}", str(inputs["sft"])) for o in overrides)
    result = compare_processes.compare_stage(stage, inputs, tmp_path, processes=2, batch=4, steps=8, accel=accel,
                                             overrides=overrides)
    one, two = check_sharded(result, stage)
    if accel == "fsdp":
        blocks = 5 if stage == "ppo" else 2  # the tiny models' blocks (PPO: the policy's 2 and its critic's 3)
        assert json.loads((two / "summary.json").read_text())["fsdp_modules"]["GPT2Block"] == blocks


def check_sharded(result: dict, stage: str) -> tuple[Path, Path]:
    """What every sharded comparison shows: the losses, the files (but the checkpoints' format), a
    saved model that computes what the one-process model computes (logits within 1e-4), and adapter
    tensors within 1e-4 of the one-process run's (measured: 6e-8). Models are compared by what they
    compute, not weight by weight: some weights have a gradient that is zero in exact arithmetic (an
    attention key bias; under the pairwise reward loss, the final LayerNorm's bias, a shift shared by
    every score), which Adam turns from rounding noise into steps of about the learning rate,
    differently in every run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    print(compare_processes.table(result))
    for key, curve in result["keys"].items():
        assert curve["max_rel_diff"] <= RTOL, f"{stage} {key}: {curve}"
    one, two = (Path(result["runs"][n]) for n in (1, 2))
    assert (two / "DONE").exists()

    def files(d):
        return [f for f in compare_processes.outputs(d) if not f.startswith("checkpoints/")]
    assert files(one) == files(two) and result["metrics_lines"][0] == result["metrics_lines"][1]
    adapters = [f for f in files(one) if f.endswith("adapter_model.safetensors")]
    for name in adapters:
        a, b = load_file(one / name), load_file(two / name)
        assert sorted(a) == sorted(b), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=f"{name} {key}")
    if "model.safetensors" in files(one):  # a full model: fine-tuned, or LoRA merged (classify, reward)
        cls = AutoModelForSequenceClassification if stage in ("classify", "reward") else AutoModelForCausalLM
        ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = (cls.from_pretrained(str(d))(input_ids=ids).logits for d in (one, two))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert adapters or "model.safetensors" in files(one)
    return one, two
