"""The math of PPO for language models (posttrain/ppo.py runs it): pure functions on padded [B, R]
tensors with a response mask (masked statistics, per-token KL, shaped rewards, GAE, the clipped policy
and value losses), and the KL controllers. Steps 3-7 of posttrain/ppo.py's docstring say how they fit
together; nothing here touches a model, a process group or an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over processes (identity on one process)

# -- the math: pure functions on padded [B, R] tensors with a response mask ---------------------------------


def masked_mean(values: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Mean over the positions where mask is 1 (over all processes when `reduce` sums across them)."""
    total, count = (values * mask).sum(), mask.sum().to(values.dtype)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Population variance (no Bessel correction) over the masked positions."""
    mean = masked_mean(values, mask, reduce)
    return masked_mean((values - mean) ** 2, mask, reduce)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Scale to unit variance (and zero mean if `shift_mean`) over the masked positions; padding becomes 0."""
    mean, var = masked_mean(values, mask, reduce), masked_var(values, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of the sampled tokens."""
    log_ratio = ref_logprobs - logprobs  # log r, r = p_ref / p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last real token (masks are a prefix of ones)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """-kl_coef * KL at every real token, plus the sequence score at the last real token; 0 on padding."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation -> (advantages, returns), both 0 on padding. The value after the
    last real token is 0: the episode ends there, so nothing is bootstrapped from padding."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate -> (loss, clip_fraction, approx_kl). The max of the two terms is the pessimistic
    one: a token whose ratio already moved past the clip range in its advantage's direction gets no gradient.
    approx_kl is the k3 estimate of KL(old || new), a check on how far the epochs moved the policy."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss -> (loss, clip_fraction): the value may not move more than clip_range_value
    from its rollout-time estimate per iteration without paying the larger of the two errors."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err).float(), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token entropy of the distributions given by `logits` [B, R, V] over the masked tokens."""
    probs = F.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return masked_mean(entropy, mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    return 1 - masked_var(returns - values, mask, reduce) / masked_var(returns, mask, reduce).clamp(min=1e-8)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-prob of each token under the distribution of its logits: [B, R, V], [B, R] -> [B, R]."""
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logits(kept_logits: Tensor, temperature: float) -> Tensor:
    """The sampling distribution at each response token: a forward pass with logits_to_keep=R+1 gives
    [B, R+1, V], where position P-1+t predicts response token t; -> [B, R, V], fp32, divided by the
    sampling temperature. Every log-prob PPO compares (sampled "old", reference, recomputed new) goes
    through here, so the ratio is exactly 1 before the first update."""
    return kept_logits[:, :-1].float() / temperature


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id lists -> (ids, attention_mask), left-padded so that every response starts at one column."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


class Minibatch(NamedTuple):
    """The part of a rollout one optimizer step reads (Rollout.minibatch)."""

    input_ids: Tensor
    attention_mask: Tensor
    tokens: Tensor  # [b, R] the sampled response tokens
    mask: Tensor  # [b, R] response mask
    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor


def ppo_loss(logits: Tensor, values: Tensor, mb: Minibatch, c) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 6's loss on one minibatch, from the current policy's response_logits [b, R, V] and the
    critic's values [b, R] -> (loss, stats): clipped policy loss + vf_coef * clipped value loss -
    entropy_coef * entropy."""
    logprobs = token_logprobs(logits, mb.tokens)
    pg_loss, clip_fraction, approx_kl = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, c.clip_range)
    vf_loss, vf_clip_fraction = value_loss(values, mb.old_values, mb.returns, mb.mask, c.clip_range_value)
    with torch.set_grad_enabled(c.entropy_coef > 0):  # no graph through the softmax when unused
        entropy = entropy_from_logits(logits, mb.mask)
    loss = pg_loss + c.vf_coef * vf_loss - c.entropy_coef * entropy
    return loss, {"policy_loss": pg_loss, "value_loss": vf_loss, "clip_fraction": clip_fraction,
                  "approx_kl": approx_kl, "value_clip_fraction": vf_clip_fraction, "entropy": entropy}


# -- KL control -------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: nudge kl_coef so that the per-sequence KL tracks `target`. The error is clipped
    to +-20% and applied at a rate of n_steps / horizon per update (n_steps = sequences in the rollout)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
