"""The PPO stage end to end on tiny models: proxy and gold logged, monitor run, checkpoints, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import cli, write


def _recipe(tmp_path, small_world, tiny_sft, tiny_reward, name, ppo_extra="", extra=""):
    return str(write(tmp_path / f"{name}.yaml", f"""\
stage: ppo
model: {{path: {tiny_sft}{extra}}}
data: {{train: {small_world}/ppo_prompts.jsonl, max_length: 128}}
ppo:
  reward_model: {tiny_reward}
  verifier: {small_world}
  iterations: 6
  rollout_batch_size: 8
  minibatch_size: 4
  max_new_tokens: 12
  eval_every: 3{ppo_extra}
eval: {{prompts: {small_world}/eval_prompts.jsonl, verifier: {small_world}, limit: 16, max_new_tokens: 12}}
train: {{lr: 1.0e-4, save_every: 2, keep_checkpoints: 2}}
output_dir: {tmp_path / name}
"""))


def test_ppo_logs_proxy_gold_and_curves(tmp_path, small_world, tiny_sft, tiny_reward):
    cli("ppo", _recipe(tmp_path, small_world, tiny_sft, tiny_reward, "ppo"), check=True)
    out = tmp_path / "ppo"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "proxy" in r] == [1, 2, 3, 4, 5, 6]
    for key in ("proxy", "gold", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                "response_length", "time_generate", "time_train"):
        assert key in rows[0], key
    assert any("eval_gold" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_proxy", "final_gold", "kl_to_ref", "gold_score", "reward_hacking", "time_generate_fraction"):
        assert key in summary, key
    # before the first update the policy is the reference, so the first rollout's KL to it is 0
    assert abs(rows[0]["kl"]) < 1e-5
    for r in (r for r in rows if "proxy" in r):
        assert 0.0 <= r["clip_fraction"] <= 1.0 and 0.0 <= r["stop_rate"] <= 1.0 and 0.0 <= r["gold"] <= 1.0
        assert 1.0 <= r["response_length"] <= 12 and r["explained_variance"] <= 1.0 and r["value_loss"] >= 0.0
    assert 0.0 <= summary["gold_score"] <= 1.0 and summary["kl_to_ref"] >= 0.0 and summary["final_kl"] >= 0.0
    assert summary["proxy_norm_std"] > 0 and isinstance(summary["reward_hacking"], bool)
    assert 0.0 < summary["time_generate_fraction"] < 1.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "plots" / "reward.png").exists() and (out / "model.safetensors").exists()


def test_ppo_on_the_gold_reward_alone_with_lora(tmp_path, small_world, tiny_sft, tiny_reward):
    recipe = _recipe(tmp_path, small_world, tiny_sft, tiny_reward, "gold",
                     ppo_extra="\n  gold_weight: 1.0\n  rm_weight: 0.0\n  value_model: head",
                     extra=", lora: {r: 8, alpha: 16, dropout: 0.0}")
    cli("ppo", recipe, "--set", "ppo.reward_model=null", check=True)
    summary = json.loads((tmp_path / "gold" / "summary.json").read_text())
    assert summary["lora"] is True and "final_gold" in summary and "final_proxy" not in summary
    assert (tmp_path / "gold" / "adapter_config.json").exists()


@pytest.mark.parametrize("case", ["empty", "too_long"])
def test_bad_prompts(tmp_path, small_world, tiny_sft, tiny_reward, case):
    prompt = "" if case == "empty" else "word " * 200
    data = write(tmp_path / "p.jsonl", json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    recipe = _recipe(tmp_path, small_world, tiny_sft, tiny_reward, case)
    proc = cli("ppo", recipe, "--set", f"data.train={data}", "--set", "ppo.verifier=null", "--set", "eval.verifier=null")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "p.jsonl:2:" in proc.stderr and ("empty prompt" if case == "empty" else "exceeds data.max_length") in proc.stderr
    assert not (tmp_path / case).exists()
