"""DPO: runs with a frozen copy, with LoRA (reference = adapter off, no copy), with precomputed
reference log-probs; reports preference accuracy, KL to the reference and gold before/after."""

from __future__ import annotations

import json

import pytest
from conftest import cli, write


def _recipe(tmp_path, small_world, tiny_sft, name, extra=""):
    return str(write(tmp_path / f"{name}.yaml", f"""\
stage: dpo
model: {{path: {tiny_sft}{extra}}}
data: {{train: {small_world}/pref_train.jsonl, eval: {small_world}/pref_eval.jsonl, max_length: 128}}
dpo: {{beta: 0.1}}
eval: {{prompts: {small_world}/eval_prompts.jsonl, verifier: {small_world}, limit: 24, max_new_tokens: 16}}
train: {{max_steps: 8, lr: 1.0e-3, batch_size: 8, save_every: 100}}
logging: {{every: 2}}
output_dir: {tmp_path / name}
"""))


@pytest.mark.parametrize("variant", ["full", "lora", "precompute"])
def test_dpo_variants(tmp_path, small_world, tiny_sft, variant):
    extra = ", lora: {r: 8, alpha: 16, dropout: 0.0}" if variant == "lora" else ""
    args = ["--set", "dpo.precompute_ref=true"] if variant == "precompute" else []
    if variant == "full":
        args = ["--set", "dpo.sft_weight=1.0"]  # RPO: DPO + the NLL of the chosen answers
    proc = cli("dpo", _recipe(tmp_path, small_world, tiny_sft, variant, extra), *args, check=True)
    summary = json.loads((tmp_path / variant / "summary.json").read_text())
    for key in ("eval_preference_accuracy", "eval_reward_margin", "kl_to_ref", "gold_score", "ref_gold_score",
                "delta_gold_score", "refusal_rate", "ref_refusal_rate"):
        assert key in summary, key
    assert summary["reference"] == {"full": "frozen copy", "lora": "adapter disabled",
                                    "precompute": "precomputed log-probs"}[variant]
    assert (tmp_path / variant / "eval_answers_before.jsonl").exists()
    losses = [json.loads(line)["loss"] for line in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]  # 8 steps at lr 1e-3 on 8 pairs a step: DPO's loss falls
    if variant != "full":  # the policy starts as the reference: every implicit reward is 0, the loss log 2
        assert abs(losses[0] - 0.6931) < 1e-3
    assert 0.0 <= summary["eval_preference_accuracy"] <= 1.0 and summary["kl_to_ref"] >= 0.0
    assert 0.0 <= summary["eval_logprob_accuracy_before"] <= 1.0 and summary["kl_to_ref_stderr"] >= 0.0
    assert summary["delta_gold_score"] == pytest.approx(summary["gold_score"] - summary["ref_gold_score"])
    if variant == "lora":
        assert (tmp_path / variant / "adapter_config.json").exists()
    if variant == "full":
        # The DPO term starts at log 2 (policy = reference); the chosen answers' NLL comes on top of it.
        first = next(json.loads(line) for line in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
                     if "loss" in json.loads(line))
        assert summary["sft_weight"] == 1.0 and first["loss"] > 0.75
    assert "dpo summary" in proc.stdout


def test_lora_dpo_keeps_no_reference_copy(small_world, tiny_sft):
    """With LoRA, TRL's DPOTrainer holds no reference model: the adapter is switched off instead."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_causal_lm, load_tokenizer, lora_config
    from posttrain.recipe import LoraConfig

    tok = load_tokenizer(str(tiny_sft))
    model = load_causal_lm(str(tiny_sft), tokenizer=tok)
    rows = [json.loads(line) for line in (small_world / "pref_train.jsonl").read_text().splitlines()[:8]]
    for r in rows:
        r.pop("flaw"), r.pop("gold")
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir="/tmp/unused-dpo", bf16=False, report_to=[]),
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config(LoraConfig(r=4, alpha=8), "CAUSAL_LM"))
    assert trainer.ref_model is None
    assert sum(1 for m in trainer.model.modules() if type(m).__name__ == "GPT2LMHeadModel") == 1
