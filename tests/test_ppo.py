"""PPO: the math checked against numbers worked out by hand, then tiny end-to-end runs on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from posttrain.errors import UserError
from posttrain.monitor import detect_reward_hacking
from posttrain.ppo import (
    AdaptiveKLController,
    FixedKLController,
    NonFiniteError,
    PPOConfig,
    PPOTrainer,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)

approx = pytest.approx


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a shared CPU makes several threads far slower still."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# -- the math ---------------------------------------------------------------------------------------------

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # 3 real tokens, then padding


def test_masked_statistics_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    # mean of 1, 2, 3 = 2; population variance = (1 + 0 + 1) / 3 = 2/3; std = 0.816497
    assert masked_mean(x, MASK).item() == approx(2.0)
    assert masked_var(x, MASK).item() == approx(2 / 3)
    # (x - 2) / 0.816497 = -1.224745, 0, 1.224745; the pad becomes 0
    assert masked_whiten(x, MASK)[0].tolist() == approx([-1.224745, 0.0, 1.224745, 0.0], abs=1e-5)
    # shift_mean=False keeps the mean: 2 + the above
    assert masked_whiten(x, MASK, shift_mean=False)[0].tolist() == approx([0.775255, 2.0, 3.224745, 0.0], abs=1e-5)
    # a reduce that sums over "processes" (here: two identical ones) leaves the statistics as they are
    assert masked_var(x, MASK, reduce=lambda t: 2 * t).item() == approx(2 / 3)


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.4]))
    # k1 = logp - ref: log 2 = 0.693147, log 0.5 = -0.693147
    assert kl_per_token(logp, ref, "k1").tolist() == approx([0.693147, -0.693147], abs=1e-6)
    # k3 = (r - 1) - log r, r = p_ref / p: r = 0.5 -> -0.5 + 0.693147; r = 2 -> 1 - 0.693147
    assert kl_per_token(logp, ref, "k3").tolist() == approx([0.193147, 0.306853], abs=1e-6)
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp, ref, "k2")


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # -0.5 * kl on real tokens; score 2 at index 2 of row 0 (2 - 0.15), score -1 at index 0 of row 1 (-1 - 0.25)
    rewards = shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert rewards.tolist() == [approx([-0.05, -0.1, 1.85, 0.0]), approx([-1.25, 0.0, 0.0, 0.0])]


def test_gae_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])  # the pad's 5 and 9 must be ignored
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    # gamma=1, lam=0.5. t=2 is last: delta = 1 - 0.4 = 0.6 (no bootstrap), A2 = 0.6
    # t=1: delta = 0 + 0.4 - 0.2 = 0.2, A1 = 0.2 + 0.5 * 0.6 = 0.5
    # t=0: delta = 0 + 0.2 - 0.5 = -0.3, A0 = -0.3 + 0.5 * 0.5 = -0.05; returns = A + V
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == approx([-0.05, 0.5, 0.6, 0.0])
    assert ret[0].tolist() == approx([0.45, 0.7, 1.0, 0.0])
    # gamma=0.9, lam=0.5 (gamma*lam = 0.45): A2 = 0.6; delta1 = 0.9*0.4 - 0.2 = 0.16, A1 = 0.16 + 0.45*0.6 = 0.43
    # delta0 = 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.45*0.43 = -0.1265
    adv, ret = gae(rewards, values, MASK, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == approx([-0.1265, 0.43, 0.6, 0.0])
    assert ret[0].tolist() == approx([0.3735, 0.63, 1.0, 0.0])


def test_policy_loss_clips_pessimistically():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])
    logprobs = torch.log(ratios).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2 (clipped)     A=-1 r=1.5: max(1.5, 1.2) = 1.5
    #   A=+1 r=0.5: max(-0.5, -0.8) = -0.5               A=-1 r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    # mean = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15; clip fraction = 2/4
    # approx_kl = mean of (r - 1) - log r: 0.5 - 0.405465 = 0.094535 (twice), -0.5 + 0.693147 = 0.193147 (twice)
    loss, clip_fraction, approx_kl = policy_loss(logprobs, torch.zeros(1, 5), advantages, mask, clip_range=0.2)
    assert loss.item() == approx(0.15)
    assert clip_fraction.item() == approx(0.5)
    assert approx_kl.item() == approx((2 * 0.094535 + 2 * 0.193147) / 4, abs=1e-6)
    # clipped tokens get no gradient; the others d/dlogp (-A r) / 4 = -A r / 4; the pad none
    loss.backward()
    assert logprobs.grad[0].tolist() == approx([0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0])
    # exactly at the clip range both terms agree: -A * 1.2
    at_edge, _, _ = policy_loss(torch.log(torch.tensor([[1.2]])), torch.zeros(1, 1), torch.ones(1, 1),
                                torch.ones(1, 1), clip_range=0.2)
    assert at_edge.item() == approx(-1.2)


def test_value_loss_clips():
    old, returns = torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, -0.1, 3.0]])
    # clip 0.2 -> clipped values 0.2, 0.2, -0.1
    #   (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    #   (0.5-0)^2 = 0.25 vs (0.2-0)^2 = 0.04 -> 0.25
    #   (-0.1-1)^2 = 1.21 both -> 1.21
    # loss = 0.5 * (0.64 + 0.25 + 1.21) / 3 = 0.35; clip fraction 1/3
    loss, clip_fraction = value_loss(values, old, returns, MASK, clip_range_value=0.2)
    assert loss.item() == approx(0.35)
    assert clip_fraction.item() == approx(1 / 3)


def test_entropy_and_explained_variance():
    logits = torch.zeros(1, 4, 8)  # uniform over 8 tokens: entropy log 8
    logits[0, 3] = torch.tensor([100.0] + [0.0] * 7)  # a padded, near-certain position must not count
    assert entropy_from_logits(logits, MASK).item() == approx(math.log(8), abs=1e-5)
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    assert explained_variance(returns, returns, MASK).item() == approx(1.0)
    # values = mean of returns: residual variance = variance of returns -> 0
    assert explained_variance(torch.full((1, 4), 2.0), returns, MASK).item() == approx(0.0, abs=1e-6)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # error 12/6 - 1 = 1, clipped to 0.2: x (1 + 0.2 * 100 / 10000) = 1.002
    assert ctl.value == approx(0.1002)
    ctl.update(3.0, n_steps=100)  # error -0.5 clipped to -0.2: x 0.998
    assert ctl.value == approx(0.1002 * 0.998)
    ctl.update(6.6, n_steps=1000)  # error 0.1 (inside the clip): x (1 + 0.1 * 0.1) = 1.01
    assert ctl.value == approx(0.1002 * 0.998 * 1.01)


def test_monitor_flags_proxy_up_gold_down():
    proxy = [0.1 * i for i in range(30)]
    gold = [0.02 * i if i < 12 else 0.24 - 0.02 * (i - 12) for i in range(30)]  # peaks at 12, then falls
    check = detect_reward_hacking(proxy, gold, window=5, min_gold_drop=0.03)
    assert check.flagged
    # proxy rises 0.5 between any two adjacent windows. Gold, windows A = t-9..t-5 and B = t-4..t:
    #   t=17: A 8-12 mean 0.20, B 13-17 mean 0.18: drop 0.02 < 0.03, correlation -0.29 > -0.5: no
    #   t=18: A 9-13 mean 0.212, B 14-18 mean 0.16: drop 0.052: yes;  t=19: drop 0.216 - 0.14 = 0.076: yes
    # patience 2: the alarm fires at t=19
    assert check.iteration == 19
    assert "proxy rose" in check.reason


def test_monitor_quiet_when_both_rise_or_noise():
    proxy = [0.05 * i for i in range(60)]
    assert not detect_reward_hacking(proxy, [0.02 * i for i in range(60)]).flagged
    # noise: gold rising 0.01 per iteration under noise of std 0.02; both flat under noise of std 0.03
    noise = torch.randn(3, 60, generator=torch.Generator().manual_seed(0)).tolist()
    assert not detect_reward_hacking(proxy, [0.01 * i + 0.02 * e for i, e in enumerate(noise[0])]).flagged
    assert not detect_reward_hacking([0.5 + 0.03 * e for e in noise[1]], [0.5 + 0.03 * e for e in noise[2]]).flagged
    # gold measured every other iteration only: a clear divergence is still flagged
    gold = [None if i % 2 else 1.0 - 0.05 * i for i in range(60)]
    assert detect_reward_hacking(proxy, gold).flagged


# -- tiny models ----------------------------------------------------------------------------------------

VOCAB, EOS, PAD, TARGET = 64, 62, 63, "t7"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(62)} | {"<eos>": EOS, "<pad>": PAD}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_config(**kw) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                      bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, **kw)


def tiny_gpt(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config(**kw))


def prompts(n: int, seed: int) -> tuple[list[dict], list[list[int]]]:
    """Random prompts of 2 to 6 tokens (different lengths, so left padding is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 62, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
           for _ in range(n)]
    return [{"prompt": p} for p in ids], ids


def count_target(rows: list[dict], responses: list[str], stopped: list[bool]) -> dict:
    """Toy reward: the share of response tokens (out of 8) that are t7. Gold: the same, halved, for logging."""
    score = torch.tensor([r.split().count(TARGET) / 8 for r in responses])
    return {"score": score, "proxy": score, "gold": score / 2}


def make_trainer(policy=None, value_model=None, ref="copy", reward_fn=count_target, **overrides) -> PPOTrainer:
    policy = policy if policy is not None else tiny_gpt()
    if ref == "copy":
        ref = tiny_gpt()
    config = PPOConfig(**{**dict(rollout_batch_size=16, minibatch_size=8, ppo_epochs=2, lr=3e-3, max_new_tokens=8,
                                 init_kl_coef=0.01, vf_coef=0.5), **overrides})
    return PPOTrainer(policy, value_model, tiny_tokenizer(), reward_fn, config, Accelerator(cpu=True), ref_policy=ref)


def train(trainer: PPOTrainer, iterations: int, start: int = 0) -> list[dict]:
    return [trainer.train_iteration(*prompts(16, seed=i)) for i in range(start, start + iterations)]


def early_late(history: list[dict], key: str = "score", k: int = 5) -> tuple[float, float]:
    return sum(h[key] for h in history[:k]) / k, sum(h[key] for h in history[-k:]) / k


# -- rollouts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_match_generation(monkeypatch, temperature):
    """The log-probs PPO recomputes over the padded batch (position ids from the attention mask) are those
    the sampler used token by token with the KV cache."""
    trainer = make_trainer(temperature=temperature)
    captured = {}
    generate = trainer.policy.generate

    def spy(**kwargs):
        out = generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured["logits"] = torch.stack(out.logits, 1)  # raw logits, one step per response token
        return out.sequences

    monkeypatch.setattr(trainer.policy, "generate", spy)
    ro = trainer.rollout(*prompts(16, seed=3))
    at_sampling = torch.log_softmax(captured["logits"] / temperature, -1)
    at_sampling = at_sampling.gather(-1, ro.response_tokens.unsqueeze(-1)).squeeze(-1)
    assert len({len(p) for p in prompts(16, seed=3)[1]}) > 1  # prompts of several lengths
    assert torch.allclose(ro.logprobs * ro.response_mask, at_sampling * ro.response_mask, atol=1e-4)
    # policy == reference here (same seed), so the per-token KL is ~0
    assert ro.kl.abs().max().item() < 1e-4


def test_rollout_keeps_the_stop_token_and_masks_what_follows():
    def stop_bonus(rows, responses, stopped):
        return {"score": torch.ones(len(responses))}

    # an untrained model emits EOS with p ~ 1/64 per token: about 30% of 24-token responses stop
    trainer = make_trainer(reward_fn=stop_bonus, no_stop_penalty=0.5, max_new_tokens=24, rollout_batch_size=24)
    ro = trainer.rollout(*prompts(24, seed=1))
    tokens, mask = ro.response_tokens, ro.response_mask
    for row in range(len(tokens)):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # a prefix of ones
        if ro.stopped[row]:
            assert tokens[row, n - 1] == EOS and EOS not in tokens[row, : n - 1].tolist()
            assert ro.score[row] == 1.0 and "<eos>" not in ro.responses[row]
        else:
            assert n == tokens.shape[1] and ro.score[row] == 0.5  # never stopped: penalised
        assert (ro.advantages[row, n:] == 0).all() and (ro.kl[row, n:] == 0).all()
    assert ro.stopped.any() and not ro.stopped.all()
    with pytest.raises(ValueError, match="rollout_batch_size"):  # every process must pass the same number
        trainer.rollout(*prompts(5, seed=0))


# -- training ----------------------------------------------------------------------------------------------


def test_tiny_run_learns_the_toy_reward():
    trainer = make_trainer()
    history = train(trainer, 30)
    early, late = early_late(history)  # share of t7 tokens, from ~1/64 at random
    assert late > early + 0.5, (early, late)
    last = history[-1]
    for key in ("score", "proxy", "gold", "kl", "kl_coef", "entropy", "clip_fraction", "approx_kl", "policy_loss",
                "value_loss", "value_clip_fraction", "explained_variance", "response_length", "stop_rate",
                "time_generate", "time_score", "time_forward", "time_train", "generated_width"):
        assert key in last and math.isfinite(last[key]), key
    assert last["gold"] == approx(last["proxy"] / 2)
    assert last["kl"] > 0.1  # moved away from the reference


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # from peft
def test_lora_policy_uses_the_adapter_disabled_model_as_reference():
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      lora_dropout=0.0)
    # GPT-2's 0.02 init is too flat for rank-8 adapters to move in 30 iterations; wider weights stand in for
    # a pretrained model's
    policy = get_peft_model(tiny_gpt(initializer_range=0.2), lora)
    trainer = make_trainer(policy=policy, ref=None, lr=1e-2)
    assert trainer.ref_policy is None  # no second copy of the model anywhere in the trainer
    assert sum(isinstance(m, GPT2LMHeadModel) for m in trainer.wrapper.modules()) == 1
    history = train(trainer, 30)
    assert history[0]["kl"] == approx(0.0, abs=1e-5)  # LoRA starts as the identity: policy == reference
    early, late = early_late(history)
    assert late > early + 0.3, (early, late)
    assert history[-1]["kl"] > 1.0
    with pytest.raises(UserError, match="reference"):
        make_trainer(ref=None)  # a full policy without a reference copy


def test_critic_from_a_sequence_classification_model():
    torch.manual_seed(1)
    critic = GPT2ForSequenceClassification(tiny_config(num_labels=1))
    trainer = make_trainer(value_model=critic)
    assert trainer.wrapper.value_head is None
    before = critic.score.weight.clone()
    history = train(trainer, 4)
    assert not torch.equal(before, critic.score.weight)  # the critic is trained
    assert all(math.isfinite(h["value_loss"]) for h in history)


def test_non_finite_reward_or_gradient_stops_before_the_update():
    def nan_reward(rows, responses, stopped):
        return {"score": torch.full((len(responses),), float("nan"))}

    trainer = make_trainer(reward_fn=nan_reward)
    with pytest.raises(NonFiniteError, match="reward") as err:
        train(trainer, 1)
    assert err.value.what == "reward" and err.value.iteration == 1

    trainer = make_trainer()
    before = [p.clone() for p in trainer.wrapper.parameters()]
    trainer.wrapper.value_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError, match="gradients"):
        train(trainer, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.wrapper.parameters(), strict=True))


def test_resume_is_bit_identical(tmp_path):
    straight = make_trainer(target_kl=1.0, kl_horizon=100)  # adaptive KL: its state must be saved too
    expected = train(straight, 4)[-1]

    first = make_trainer(target_kl=1.0, kl_horizon=100)
    train(first, 2)
    torch.save(first.state_dict(), tmp_path / "ppo.pt")
    torch.manual_seed(1234)  # the caller's own use of the global RNG must not matter
    resumed = make_trainer(target_kl=1.0, kl_horizon=100)
    resumed.load_state_dict(torch.load(tmp_path / "ppo.pt", weights_only=False))
    got = train(resumed, 2, start=2)[-1]

    timings = {"time_generate", "time_score", "time_forward", "time_train"}
    assert {k: v for k, v in got.items() if k not in timings} == {k: v for k, v in expected.items() if k not in timings}
    for a, b in zip(straight.wrapper.parameters(), resumed.wrapper.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ppo_settings_are_the_recipes():
    """PPOConfig is the recipe's ppo knobs plus train.lr / adam_beta2 / max_grad_norm and the seed: one
    definition (posttrain/recipe.py PpoKnobs), so the library and the stage cannot disagree on a default."""
    from posttrain.recipe import PpoKnobs
    from posttrain.recipe_file import load_recipe

    recipe = load_recipe("recipes/world/ppo.yaml", ["seed=3"])
    config = PPOConfig.from_recipe(recipe)
    for key in PpoKnobs.model_fields:
        assert getattr(config, key) == getattr(recipe.ppo, key), key
    assert (config.lr, config.adam_beta2, config.max_grad_norm, config.seed) == (
        recipe.train.lr, recipe.train.adam_beta2, recipe.train.max_grad_norm, 3)
    assert PPOConfig(lr=1e-5).model_dump(include=set(PpoKnobs.model_fields)) == PpoKnobs().model_dump()
