"""PPO for language models: classic RLHF (Ziegler et al. 2019, Ouyang et al. 2022), on torch + Accelerate.

One iteration, `PPOTrainer.train_iteration(prompt_rows, prompt_ids)`, in order:

1. Rollout. Left-pad this process's prompts and sample one response each from the policy with the KV cache
   (`generate`, temperature, top_p). A response ends at its first stop token; the stop token belongs to
   the response and is trained, everything after it is padding. `response_mask` is 1 on real response
   tokens, 0 after them. Everything below works on tensors of shape [B, R] plus that mask.
2. Score. `reward_fn(prompt_rows, responses, stopped)` returns a sequence score per response (a reward
   model, a verifier, a mix: the caller decides). A response that never stopped loses `no_stop_penalty`.
3. Log-probs and values, without gradients: the policy's log-prob of each sampled token ("old" log-probs),
   the reference policy's log-prob of it, and the critic's value of the state before it.
4. Per-token reward: reward_t = -kl_coef * KL_t, and the sequence score is added at the last real token.
   KL_t estimates KL(policy || reference) from the sampled token: k1 = logp - logp_ref (unbiased, can be
   negative) or k3 = (r - 1) - log r with r = p_ref / p (always >= 0, lower variance).
5. GAE: delta_t = reward_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A
   zero past the last real token (the episode ends there, nothing is bootstrapped). Returns = A + V.
   Advantages are whitened over the whole rollout batch (all processes) when `whiten_advantages`.
6. Optimise, `ppo_epochs` passes over shuffled minibatches. With ratio = exp(logp - logp_old):
   policy loss   = mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))
   value loss    = 0.5 * mean of max((V - G)^2, (V_clipped - G)^2), V_clipped = V_old + clip(V - V_old, +-clip_range_value)
   loss          = policy loss + vf_coef * value loss - entropy_coef * entropy
   then clip the gradient norm to `max_grad_norm` and take an AdamW step. Rewards, losses and gradient norms
   are checked for NaN/inf first: `NonFiniteError` is raised before a bad optimizer step.
7. KL control. Fixed kl_coef, or Ziegler's adaptive controller: e = clip(KL / target_kl - 1, -0.2, 0.2),
   kl_coef *= 1 + e * n / kl_horizon, where KL is the mean per-sequence KL of this rollout and n the number
   of sequences it held (all processes).

The knobs (`PPOConfig`) are defined once, with their defaults, ranges and meaning, in posttrain/recipe.py
PpoKnobs; a recipe's `ppo:` section sets them, and `train:` the optimiser's lr, adam_beta2 and max_grad_norm.

Models. The policy is an HF causal LM, full or a peft `PeftModel` (LoRA). The reference is a frozen copy
(`ref_policy`), or for a LoRA policy with no copy given, the policy itself with its adapters disabled, so a
second model never sits in memory. The critic is either `value_model`, a sequence-classification model with
one label (e.g. built from the reward model, as in Ouyang et al.) whose score head is applied to its hidden
state at every position, or, when `value_model` is None, a value head: a zero-initialised Linear on the
policy's last hidden states, sharing the policy's trunk (the value loss then trains the trunk too).

Kept: everything above (the math in posttrain/ppo_math.py), data-parallel rollouts under `accelerate launch`
(each process samples its own prompts; whitening and logged statistics are reduced over processes), bit-
identical resume on CPU. Left out: reward whitening and clipping, learning-rate schedules, early stopping of
the epochs on approx_kl, value-head dropout, a separate critic optimizer or clip norm (one AdamW, one joint
gradient clip), top_p-exact log-probs (they come from the full tempered softmax, as in TRL), several samples
per prompt (GRPO's territory), and DeepSpeed (the gradients are checked for NaN before each optimizer step,
which DeepSpeed's engine takes inside backward). Under FSDP2 the policy, its critic or value head and the
reference are sharded; each rollout generates with the policy's weights gathered once
(sharding.whole_weights), not again for every token; checkpoints hold whole tensors. Losses are token means
over the minibatches of all processes together (each process weights its own token mean by its share of the
tokens before DDP averages the gradients), so N processes with rollout_batch_size B and minibatch_size M
take the same steps as one process with N*B and N*M when each epoch is one minibatch; with several, each
process shuffles only its own rollouts.

Models stay in eval mode throughout: dropout would make the recomputed log-probs differ from the sampled
ones, so the ratio would not start at 1.

The reward-hacking monitor that reads the logged proxy and gold rewards is posttrain/monitor.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from pydantic import Field
from torch import Tensor, nn

from posttrain.errors import UserError
from posttrain.ppo_math import (  # noqa: F401 - the math, importable from here as before
    AdaptiveKLController,
    FixedKLController,
    Minibatch,
    Reduce,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    last_token_index,
    left_pad,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    ppo_loss,
    response_logits,
    shaped_rewards,
    token_logprobs,
    value_loss,
)
from posttrain.recipe import PpoKnobs, TrainSection
from posttrain.sampling import position_ids_from
from posttrain.sharding import whole_weights

# -- the trainer --------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """NaN or inf in rewards, the loss or the gradients. Raised on every process before the optimizer step
    that would have used it; earlier minibatches of the same iteration may already have been applied, so
    the caller should stop and keep (or resume from) its last checkpoint."""

    def __init__(self, what: str, iteration: int):  # iteration counts from 1, as in the stats
        self.what, self.iteration = what, iteration
        super().__init__(f"non-finite {what} at PPO iteration {iteration}; stopped before the optimizer step. "
                         "Resume from the last checkpoint, e.g. with a lower lr or a smaller clip range")


class PPOConfig(PpoKnobs):
    """Everything the loop reads. The knobs, their defaults and ranges are defined once, in
    posttrain/recipe.py PpoKnobs (a recipe's `ppo:` section); the optimiser's settings a recipe keeps in
    `train:` and `seed`. `from_recipe` builds it from a ppo recipe."""

    lr: float = Field(gt=0)
    adam_beta2: float = Field(TrainSection().adam_beta2, gt=0, lt=1)
    max_grad_norm: float | None = Field(TrainSection().max_grad_norm, gt=0)  # None: no clipping
    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe) -> PPOConfig:
        knobs = recipe.ppo.model_dump(include=set(PpoKnobs.model_fields))
        t = recipe.train
        return cls(**knobs, lr=t.lr, adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm, seed=recipe.seed)


RewardFn = Callable[[list[dict], list[str], list[bool]], dict]


@dataclass
class Rollout:
    """One batch of experience. Sequences are [B, P + R] (prompt left-padded to P, response right-padded
    to R); everything per response token is [B, R] and meaningful only where response_mask is 1."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    stopped: Tensor  # [B] bool: the response ended with a stop token
    responses: list[str]  # decoded, stop token and padding excluded
    score: Tensor  # [B] the optimised sequence reward, no_stop_penalty applied
    logprobs: Tensor  # policy at sampling time ("old")
    ref_logprobs: Tensor
    values: Tensor
    kl: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)  # "proxy", "gold" ... from reward_fn, for logging
    time_generate: float = 0.0
    time_score: float = 0.0  # reward_fn (decoding, reward model, verifier)
    time_forward: float = 0.0  # log-probs of policy and reference, values, rewards and advantages

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def response_tokens(self) -> Tensor:
        return self.input_ids[:, -self.response_length:]

    def minibatch(self, idx: Tensor) -> Minibatch:
        return Minibatch(self.input_ids[idx], self.attention_mask[idx], self.response_tokens[idx], self.response_mask[idx],
                         self.logprobs[idx], self.values[idx], self.advantages[idx], self.returns[idx])


class PolicyAndValue(nn.Module):
    """The policy and its critic as one module, so that Accelerate prepares (and DDP synchronises) them as
    one. forward -> (logits at the last R+1 positions, for response_logits; values at the R positions that
    predict the last R tokens)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.value_head = None
        if critic is None:
            p = next(policy.parameters())
            self.value_head = nn.Linear(policy.config.hidden_size, 1, device=p.device, dtype=p.dtype)
            nn.init.zeros_(self.value_head.weight)  # values start at 0; identical on every process
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> tuple[Tensor, Tensor]:
        R = response_length  # noqa: N806 - the [B, R] of the module docstring
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask))
        out = self.policy(**kw, logits_to_keep=R + 1, output_hidden_states=self.critic is None, use_cache=False)
        if self.critic is None:
            values = self.value_head(out.hidden_states[-1][:, -R - 1:-1])
        else:
            hidden = self.critic.base_model(**kw, use_cache=False).last_hidden_state
            values = self.critic.score(hidden[:, -R - 1:-1])
        return out.logits, values.squeeze(-1).float()


class PPOTrainer:
    """PPO on an HF causal LM. Build it on every process, then call `train_iteration` once per batch of
    prompts; checkpoint with `state_dict` / `load_state_dict`.

    policy       causal LM, full or a peft PeftModel (only its trainable parameters are optimised)
    value_model  sequence-classification model with num_labels=1 (its `score` head is applied at every
                 position), or None for a value head on the policy's last hidden states
    tokenizer    decodes responses for reward_fn; its pad token pads (stop_ids[0] if it has none)
    reward_fn    (prompt_rows, responses, stopped) -> {"score": [B], optional "proxy": [B], "gold": [B] ...}:
                 "score" is optimised; every other [B] entry is only averaged into the stats under its name
    ref_policy   frozen reference; None with a PeftModel policy = the policy with adapters disabled
    stop_ids     tokens that end a response (default: the tokenizer's EOS)
    """

    def __init__(self, policy, value_model, tokenizer, reward_fn: RewardFn, config: PPOConfig,
                 accelerator: Accelerator | None = None, ref_policy=None, stop_ids: list[int] | None = None):
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        self.accelerator = accelerator = accelerator or Accelerator()
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("ppo: DeepSpeed is not supported by our PPO loop; shard it with recipes/accelerate/fsdp.yaml "
                            "(FSDP2), or launch with ddp.yaml")
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        if ref_policy is None and not hasattr(policy, "disable_adapter"):
            raise UserError("ppo: no reference policy: pass a frozen copy as ref_policy, or train a LoRA "
                            "(peft) policy so that the reference is the policy with its adapters disabled")
        if value_model is not None and getattr(value_model.config, "num_labels", None) != 1:
            raise UserError("ppo: value_model must be a sequence-classification model with num_labels=1")
        if value_model is not None and not isinstance(getattr(value_model, "score", None), nn.Module):
            raise UserError("ppo: value_model has no `score` head (expected e.g. GPT2ForSequenceClassification)")
        self.stop_ids = stop_ids or [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

        device = accelerator.device
        self.policy = policy.to(device).eval()  # eval: no dropout, see the module docstring
        self.ref_policy = ref_policy
        if ref_policy is not None:
            self.ref_policy = ref_policy.to(device).eval().requires_grad_(False)
        self.wrapper = PolicyAndValue(self.policy, value_model.to(device).eval() if value_model is not None else None)
        params = [p for p in self.wrapper.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, config.adam_beta2), eps=1e-5, weight_decay=0.0,
                                      fused=True)  # one kernel for all parameters (see training.trainer_kwargs)
        self.skeleton = None
        if self.sharded:
            from posttrain.sharding import shard_frozen, skeleton

            # FSDP2 shards in place: keep the policy's structure to put the gathered weights in at the end
            self.skeleton = skeleton(self.policy) if accelerator.is_main_process else None
            if self.ref_policy is not None:  # frozen, sharded too: gathered block by block for its forwards
                self.ref_policy = shard_frozen(self.ref_policy, accelerator)
        self.model, self.optimizer = accelerator.prepare(self.wrapper, optimizer)
        self.state_bytes: dict[str, int] | None = None  # what this process holds, measured after the first step

        if config.target_kl is None:
            self.kl_ctl = FixedKLController(config.init_kl_coef)
        else:
            self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        self.iteration = 0
        # Our own RNG stream, swapped in around sampling and shuffling, so that whatever else the caller
        # does with torch's global RNG (evaluation, reseeding) cannot change what the trainer samples.
        self._cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if self._cuda else []):
            torch.manual_seed(config.seed + accelerator.process_index)
            self._rng = self._get_rng()

    # -- one iteration ---------------------------------------------------------------------------------

    def train_iteration(self, prompt_rows: list[dict], prompt_ids: list[list[int]]) -> dict[str, float]:
        """Rollout on these prompts, ppo_epochs of minibatch updates, KL controller update -> flat stats."""
        with self._own_rng():
            rollout = self.rollout(prompt_rows, prompt_ids)
            stats = self._rollout_stats(rollout)
            start = time.perf_counter()
            stats.update(self._optimize(rollout))
            stats["time_train"] = time.perf_counter() - start
        self.kl_ctl.update(stats["kl"], n_steps=len(prompt_ids) * self.accelerator.num_processes)
        self.iteration += 1
        return {"iteration": self.iteration, **stats}

    @torch.no_grad()
    def rollout(self, prompt_rows: list[dict], prompt_ids: list[list[int]]) -> Rollout:
        """Steps 1-5 of the module docstring: sample, score, log-probs and values, shaped rewards, GAE."""
        c, device = self.config, self.accelerator.device
        if len(prompt_ids) != c.rollout_batch_size:  # DDP needs the same number of steps on every process
            raise ValueError(f"expected rollout_batch_size={c.rollout_batch_size} prompts, got {len(prompt_ids)}")

        start = time.perf_counter()
        prompts, prompt_mask = (t.to(device) for t in left_pad(prompt_ids, self.pad_id))
        with whole_weights(self.wrapper):  # sharded: gathered once for the whole rollout, not per token
            sequences = self.policy.generate(  # the unwrapped policy: no DDP hooks, KV cache on
                input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=c.max_new_tokens, do_sample=True,
                temperature=c.temperature, top_p=c.top_p, top_k=0, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                synced_gpus=False,  # the weights are whole here: no process waits on another per token
            )
        response = sequences[:, prompts.shape[1]:]
        is_stop = torch.isin(response, torch.tensor(self.stop_ids, device=device))
        after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0  # strictly after the first stop token
        response_mask = (~after_stop).long()
        response = response.masked_fill(after_stop, self.pad_id)
        stopped = is_stop.any(1)
        input_ids = torch.cat([prompts, response], 1)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        time_generate = time.perf_counter() - start

        start = time.perf_counter()
        responses = [self.tokenizer.decode(r[m.bool() & ~s.bool()].tolist(), skip_special_tokens=False)
                     for r, m, s in zip(response, response_mask, is_stop, strict=True)]
        out = self.reward_fn(prompt_rows, responses, stopped.tolist())
        extra = {k: torch.as_tensor(v, dtype=torch.float, device=device) for k, v in out.items()}
        score = extra.pop("score")
        if score.shape != stopped.shape:
            raise ValueError(f"reward_fn must return one score per response, got shape {tuple(score.shape)}")
        self._check_finite("reward", score)
        score = score - c.no_stop_penalty * (~stopped).float()
        time_score = time.perf_counter() - start

        start = time.perf_counter()
        logprobs, values, ref_logprobs = [], [], []
        response_length = response.shape[1]
        for i in range(0, len(input_ids), c.minibatch_size):
            ids, mask = input_ids[i:i + c.minibatch_size], attention_mask[i:i + c.minibatch_size]
            kept, v = self.wrapper(ids, mask, response_length)
            logprobs.append(token_logprobs(response_logits(kept, c.temperature), response[i:i + c.minibatch_size]))
            values.append(v)
            ref_logprobs.append(self._ref_logprobs(ids, mask, response_length))
        logprobs, values, ref_logprobs = torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs)

        mask = response_mask.float()
        values = values * mask
        kl = kl_per_token(logprobs, ref_logprobs, c.kl_estimator) * mask
        rewards = shaped_rewards(score, kl, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=self._sum)
        return Rollout(input_ids, attention_mask, mask, stopped, responses, score, logprobs, ref_logprobs, values,
                       kl, rewards, advantages, returns, extra, time_generate, time_score,
                       time.perf_counter() - start)

    def _ref_logprobs(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        if self.ref_policy is not None:
            model, context = self.ref_policy, contextlib.nullcontext()
        else:
            model, context = self.policy, self.policy.disable_adapter()
        with context:
            kept = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
                         logits_to_keep=response_length + 1, use_cache=False).logits
        return token_logprobs(response_logits(kept, self.config.temperature), input_ids[:, -response_length:])

    def _optimize(self, ro: Rollout) -> dict[str, float]:
        """Step 6: ppo_epochs passes over shuffled minibatches of the rollout."""
        c, n = self.config, self.accelerator.num_processes
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(len(ro.input_ids)).to(self.accelerator.device)
            for i in range(0, len(order), c.minibatch_size):
                mb = ro.minibatch(order[i:i + c.minibatch_size])
                kept, values = self.model(mb.input_ids, mb.attention_mask, ro.response_length)
                loss, stats = ppo_loss(response_logits(kept, c.temperature), values, mb, c)
                share = self._token_share(mb.mask)
                self._check_finite("loss", loss)
                self.accelerator.backward(loss * share)
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm or math.inf)
                self._check_finite("gradients", grad_norm)
                self.optimizer.step()
                if self.state_bytes is None:
                    self.state_bytes = self._held_bytes()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    sums[k] += v.item() * share
                sums["grad_norm"] += grad_norm.item()  # the same on every process (after DDP's all-reduce)
                steps += 1
        return {k: self._sum(torch.tensor(v / steps, device=self.accelerator.device)).item() / n
                for k, v in sums.items()}

    def _held_bytes(self) -> dict[str, int]:
        """Bytes this process holds for training: its parameters, gradients and optimizer state (its
        shards under FSDP), and the frozen reference beside them (the reward model is the caller's)."""
        from posttrain.sharding import state_bytes

        held = state_bytes(self.wrapper, self.optimizer)
        if self.ref_policy is not None:
            held["reference"] = state_bytes(self.ref_policy, None)["params"]
        return held

    def whole_policy(self):
        """The trained policy with all its weights, on the main process (None on the others); every
        process must call it. Unsharded, that is the policy itself. Under FSDP2 every process joins in
        gathering the full state, and the main process puts the policy's part into the structure kept
        before sharding (a full model or a peft model alike)."""
        if not self.sharded:
            return self.policy
        from posttrain.sharding import gather_whole

        policy, self.skeleton = gather_whole(self.wrapper, self.skeleton, self.accelerator, "policy."), None
        return policy

    def _token_share(self, mask: Tensor) -> float:
        """This process's share of the minibatch tokens of all processes, times their number: weighting each
        process's token mean by it makes DDP's average of gradients a token mean over every process's
        minibatch, not a mean of per-process means. 1 on one process."""
        n = self.accelerator.num_processes
        if n == 1:
            return 1.0
        tokens = mask.sum()
        return (tokens * n / self._sum(tokens.clone()).clamp(min=1)).item()

    def _rollout_stats(self, ro: Rollout) -> dict[str, float]:
        """Means over every sequence of every process."""
        ones = torch.ones_like(ro.score)

        def mean(x: Tensor) -> float:
            return masked_mean(x.float(), ones, self._sum).item()

        stats = {"score": mean(ro.score)}
        stats.update({k: mean(v) for k, v in ro.extra.items() if v.shape == ro.score.shape})
        stats.update(
            kl=mean(ro.kl.sum(1)), kl_coef=self.kl_ctl.value, response_length=mean(ro.response_mask.sum(1)),
            stop_rate=mean(ro.stopped), explained_variance=explained_variance(
                ro.values, ro.returns, ro.response_mask, self._sum).item(),
            time_generate=ro.time_generate, time_score=ro.time_score, time_forward=ro.time_forward,
            generated_width=float(ro.response_length),  # new positions per sequence that generate() computed
        )
        return stats

    def _sum(self, x: Tensor) -> Tensor:
        return self.accelerator.reduce(x, "sum")

    def _check_finite(self, what: str, x: Tensor) -> None:
        """Every process raises together, so none is left waiting in a collective."""
        bad = torch.tensor(float(not torch.isfinite(x).all()), device=self.accelerator.device)
        if self._sum(bad).item() > 0:
            raise NonFiniteError(what, self.iteration + 1)

    # -- random state ------------------------------------------------------------------------------------

    def _get_rng(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self._cuda:
            state["cuda"] = torch.cuda.get_rng_state(self.accelerator.device)
        return state

    @contextlib.contextmanager
    def _own_rng(self):
        with torch.random.fork_rng(devices=[self.accelerator.device] if self._cuda else []):
            torch.set_rng_state(self._rng["cpu"])
            if self._cuda:
                torch.cuda.set_rng_state(self._rng["cuda"], self.accelerator.device)
            yield
            self._rng = self._get_rng()

    # -- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: trainable parameters (policy adapters or weights,
        critic or value head), optimizer, KL coefficient, iteration and every process's RNG state. Call it
        on every process (it gathers the RNG states); save it from the main process with `torch.save`."""
        trainable = {k for k, v in self.wrapper.named_parameters() if v.requires_grad}
        if self.sharded:  # whole tensors, gathered from every process's shards (torch.distributed.checkpoint)
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            params = {k: v for k, v in get_model_state_dict(self.wrapper, options=full).items() if k in trainable}
            optimizer = get_optimizer_state_dict(self.wrapper, self.optimizer.optimizer, options=full)
        else:
            params = {k: v.detach().cpu().clone() for k, v in self.wrapper.named_parameters() if k in trainable}
            optimizer = copy.deepcopy(self.optimizer.state_dict())
        return {
            "iteration": self.iteration,
            "params": params,
            "optimizer": optimizer,
            "kl_coef": self.kl_ctl.value,
            "rng": gather_object([self._rng]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` into a trainer built the same way (same models, config and processes)."""
        missing = {k for k, v in self.wrapper.named_parameters() if v.requires_grad} - set(state["params"])
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters, e.g. {sorted(missing)[:3]}")
        if self.sharded:  # each process keeps its shard of the whole tensors
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.wrapper, state["params"], options=full)
            set_optimizer_state_dict(self.wrapper, self.optimizer.optimizer, state["optimizer"], options=full)
        else:
            self.wrapper.load_state_dict(state["params"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.value = state["kl_coef"]
        self.iteration = state["iteration"]
        rngs = state["rng"]
        if len(rngs) != self.accelerator.num_processes:
            raise ValueError(f"checkpoint was written by {len(rngs)} processes, this run has "
                             f"{self.accelerator.num_processes}")
        self._rng = rngs[self.accelerator.process_index]
