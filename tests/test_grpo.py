"""GRPO and RLOO: the verifiable rewards, per-answer seeded sampling, the stage end to end on tiny
models (every reward logged, zero-variance groups, proxy vs gold), a GSM8K-style final-number run,
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, write

from posttrain.rewards import Format, Match, choice_letter, final_number, normalise

GSM8K = ROOT.parent / "shared" / "data" / "cs336" / "gsm8k_test.jsonl"


@pytest.mark.parametrize("text, number", [
    ("So she has 5 + 3 = 8 apples.", "8"), ("It costs $1,234.50 in total", "1234.5"), ("The answer is -3.", "-3"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"), ("no digits here", None), ("2.000", "2"),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_exact_and_choice_extraction():
    assert normalise("The Eiffel  Tower!") == normalise("eiffel tower") == "eiffel tower"
    assert choice_letter("The answer is (C).") == "C"
    assert choice_letter("answer: B") == "B"
    assert choice_letter("D) because it is blue") == "D"
    assert choice_letter("(A) Paris") == "A" and choice_letter("B") == "B"
    assert choice_letter("I do not know") is None and choice_letter("A cat sat.") is None


def test_match_and_format_rewards_score_answers_against_a_field():
    stop = 0
    numbers = Match("final_number", [stop], "final_number", "answer")
    prompts = ["q1", "q2", "q3"]
    completions = [[{"role": "assistant", "content": "3 + 4 = 7"}], [{"role": "assistant", "content": "It is 8."}],
                   [{"role": "assistant", "content": "seven"}]]
    ids = [[5, 6, stop], [5, 6], [5, stop]]
    answer = ["blah #### 7", "#### 7", "#### 7"]
    assert numbers(prompts, completions, ids, answer=answer) == [1.0, 0.0, 0.0]
    exact = Match("exact", [stop], "exact", "answer")
    assert exact(["q"], ["The Seven."], [[stop]], answer=["seven"]) == [1.0]
    choice = Match("choice", [stop], "choice", "answer")
    assert choice(["q", "q"], ["The answer is B", "A"], [[stop], [stop]], answer=["(B)", "B"]) == [1.0, 0.0]
    # format: ends its turn by itself, and matches the regex when one is given
    assert Format("format", [stop], None)(prompts, completions, ids) == [1.0, 0.0, 1.0]
    assert Format("format", [stop], r"\d+$")(prompts, completions, ids) == [1.0, 0.0, 0.0]


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_sft):
    """The same seeds give the same answers in one batch of 6 or three batches of 2 (how processes split it)."""
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.sampling import answer_seed, sample
    from posttrain.templates import pad_id, prompt_ids, stop_ids

    tok = load_tokenizer(str(tiny_sft))
    model = load_causal_lm(str(tiny_sft), "float32", tokenizer=tok)
    prompts = [prompt_ids(tok, q) for q in ("What is 2 plus 3?", "Hi.", "Where does Ada live?")] * 2
    seeds = [answer_seed(0, 5, i) for i in range(6)]
    kw = dict(stop_ids=stop_ids(tok), pad_id=pad_id(tok), max_new_tokens=10)
    whole = sample(model, prompts, seeds, **kw)
    split = sample(model, prompts, seeds, **kw, batch_size=2)
    assert whole == split
    assert whole[0] != whole[3] or whole[1] != whole[4]  # the same prompt with another seed: another answer
    assert sample(model, prompts, seeds, **kw) == whole
    assert all(0 < len(a) <= 10 for a in whole)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_log_probs_do_not_depend_on_left_padding(algorithm, tmp_path, tiny_sft):
    """An answer's training log-probs are those it was sampled with, however much left padding its
    prompt got in the batch (the padding differs between 1 and N processes). TRL's own forward uses
    positions 0..T-1, which shifts a GPT-2-style model's positions by the padding: checked too, so
    this test says when TRL stops needing the fix."""
    from datasets import Dataset

    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.stages.grpo import _trl, seeded_sampling
    from posttrain.templates import pad_id, prompt_ids

    tok = load_tokenizer(str(tiny_sft))
    config_cls, trainer_cls = _trl(algorithm)
    args = config_cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=4, report_to=[], save_strategy="no")
    data = Dataset.from_list([{"prompt": "Hi."}] * 2)

    def logps(cls, padding: int):
        trainer = cls(model=load_causal_lm(str(tiny_sft), "float32", tokenizer=tok), args=args,
                      reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      train_dataset=data, processing_class=tok)
        ids = prompt_ids(tok, "Where does Ada live?") + tok("Ada lives", add_special_tokens=False)["input_ids"]
        row = torch.tensor([[pad_id(tok)] * padding + ids])
        mask = torch.tensor([[0] * padding + [1] * len(ids)])
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(trainer.model, row, mask, 3)[0]

    ours = seeded_sampling(trainer_cls)
    torch.testing.assert_close(logps(ours, 5), logps(ours, 0), rtol=0, atol=1e-5)
    assert not torch.allclose(logps(trainer_cls, 5), logps(trainer_cls, 0), atol=1e-3)


def _recipe(tmp_path: Path, world: Path, sft: Path, name: str, rewards: str, grpo: str = "", train: str = "",
            model: str = "") -> str:
    return str(write(tmp_path / f"{name}.yaml", f"""\
stage: grpo
model: {{path: {sft}{model}}}
data: {{train: {world}/ppo_prompts.jsonl, max_length: 128}}
grpo:
  rewards: {rewards}
  num_generations: 4
  max_completion_length: 12
  eval_every: 2{grpo}
train: {{max_steps: 4, batch_size: 8, lr: 1.0e-4, save_every: 2, keep_checkpoints: 2{train}}}
logging: {{every: 1}}
eval: {{prompts: {world}/eval_prompts.jsonl, verifier: {world}, limit: 16, max_new_tokens: 12}}
output_dir: {tmp_path / name}
"""))


def test_grpo_logs_every_reward_the_zero_variance_share_and_proxy_vs_gold(tmp_path, small_world, tiny_sft, tiny_reward):
    rewards = (f"[{{source: gold, path: {small_world}}}, {{source: reward_model, path: {tiny_reward}, weight: 0.0}}, "
               "{source: format, weight: 0.5}]")
    cli("grpo", _recipe(tmp_path, small_world, tiny_sft, "grpo", rewards), check=True)
    out = tmp_path / "grpo"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for name in ("gold", "reward_model", "format"):
            assert f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r, name
        assert 0.0 <= r["frac_reward_zero_std"] <= 1.0 and 0.0 <= r["gold"] <= 1.0
        assert r["gold"] == r["rewards/gold/mean"] and r["proxy"] == r["rewards/reward_model/mean"]
        # the optimised reward is the weighted sum; the reward model (weight 0) is only watched
        assert r["reward"] == pytest.approx(r["rewards/gold/mean"] + 0.5 * r["rewards/format/mean"], abs=1e-5)
        assert 1.0 <= r["completions/mean_length"] <= 12 and r["kl"] >= 0.0
    assert abs(train[0]["kl"]) < 1e-6  # the first batch: the policy is still the reference
    assert [r["step"] for r in rows if "eval_gold" in r] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_gold", "final_proxy", "final_zero_std_share", "mean_zero_std_share", "gold_score", "kl_to_ref",
                "reward_hacking", "answers_sampled", "proxy_norm_std"):
        assert key in summary, key
    assert summary["answers_sampled"] == 4 * 8 and summary["algorithm"] == "grpo" and summary["kl_to_ref"] >= 0
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for plot in ("reward.png", "zero_std.png", "rewards.png", "kl.png", "length.png"):
        assert (out / "plots" / plot).exists(), plot
    assert (out / "model.safetensors").exists() and (out / "DONE").exists()


def test_rloo_with_lora_on_the_gold_reward(tmp_path, small_world, tiny_sft):
    recipe = _recipe(tmp_path, small_world, tiny_sft, "rloo", f"[{{source: gold, path: {small_world}}}]",
                     grpo="\n  algorithm: rloo\n  scale_rewards: none", model=", lora: {r: 8, alpha: 16, dropout: 0.0}")
    cli("grpo", recipe, check=True)
    out = tmp_path / "rloo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "rloo" and summary["lora"] is True and "final_gold" in summary
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


@pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} is not here (../shared/data)")
def test_final_number_reward_on_gsm8k(tmp_path, tiny_sft):
    """Real data end to end: GSM8K questions, the final-number reward against its `#### N` answers."""
    recipe = str(write(tmp_path / "gsm8k.yaml", f"""\
stage: grpo
model: {{path: {tiny_sft}}}
data: {{train: {GSM8K}, limit: 64, max_length: 128}}
grpo:
  prompt_field: question
  rewards: [{{source: final_number, field: answer}}, {{source: format, regex: '\\d', weight: 0.1}}]
  num_generations: 4
  max_completion_length: 16
train: {{max_steps: 2, batch_size: 8, lr: 1.0e-4, save_every: 100}}
logging: {{every: 1}}
output_dir: {tmp_path / "gsm8k"}
"""))
    proc = cli("grpo", recipe)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gsm8k" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["rewards/final_number/mean"] <= 1.0 for r in rows if "reward" in r)
    assert (tmp_path / "gsm8k" / "DONE").exists()


def test_bad_input_is_one_line(tmp_path, small_world, tiny_sft, tiny_reward):
    gold = f"[{{source: gold, path: {small_world}}}]"

    def refused(recipe: str, *args: str) -> str:
        proc = cli("grpo", recipe, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    # a reward that does not exist
    assert "did you mean 'gold'" in refused(_recipe(tmp_path, small_world, tiny_sft, "a", "[{source: glod, path: x}]"))
    # num_generations that does not divide the answers per step
    assert "does not divide the 8 answers" in refused(_recipe(tmp_path, small_world, tiny_sft, "b", gold),
                                                      "--set", "grpo.num_generations=3")
    # a verifiable reward pointing at a field the prompts do not have: file and line
    err = refused(_recipe(tmp_path, small_world, tiny_sft, "c", "[{source: final_number, field: solution}]"))
    assert "ppo_prompts.jsonl:1" in err and "'solution'" in err
    # a reward-model run that never finished
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((tiny_reward / "recipe.yaml").read_text())
    err = refused(_recipe(tmp_path, small_world, tiny_sft, "d", f"[{{source: reward_model, path: {unfinished}}}]"))
    assert "grpo.rewards.0.path" in err and "DONE" in err
    # a field on a reward that reads none
    assert "field belongs to" in refused(_recipe(tmp_path, small_world, tiny_sft, "e", "[{source: format, field: x}]"))
    # vLLM on a machine without a GPU
    assert "CUDA" in refused(_recipe(tmp_path, small_world, tiny_sft, "f", gold), "--set", "grpo.vllm=true")
    for name in "abcdef":
        assert not (tmp_path / name).exists(), name  # nothing written
