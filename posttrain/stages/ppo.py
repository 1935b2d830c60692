"""RLHF with PPO (posttrain/ppo.py), from a chat model against a reward model and/or the gold verifier.

Reads:  model.path (the starting policy, usually the SFT run; also the frozen reference), model.lora,
        data.train (prompts, + gold fields for the verifier), data.max_length (prompt + answer must
        fit), ppo.* (reward sources, critic, PPO knobs, the hacking monitor), train.lr / adam_beta2 /
        max_grad_norm / save_every / keep_checkpoints, eval.* (greedy evaluation prompts).
Writes: the policy (or its LoRA adapter), eval_answers.jsonl, plots of every logged curve, and the
        usual run files; checkpoints every train.save_every iterations for resume.
Reports: per iteration proxy reward (reward model, in standard deviations of the starting policy's
        answers), gold reward, KL, entropy, clip fraction, approx-KL, value loss, explained variance,
        answer length and generate/train time; at the end the gold metrics, KL to the reference, and
        whether the proxy rose while gold fell (reward hacking).

The optimised score of an answer is rm_weight * proxy + gold_weight * gold, minus no_stop_penalty when
it never ends. The proxy is standardised with the mean and spread of the reward model's scores on the
starting policy's own answers, so its units (and the monitor's thresholds) mean the same for any
reward model.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain import data as datalib
from posttrain.errors import UserError
from posttrain.evaluate import evaluate_prompts, greedy_eval, kl_summary, policy_kl
from posttrain.models import check_max_length, load_start_model, load_tokenizer, lora_config
from posttrain.monitor import check_history
from posttrain.pickles import load_weights_only
from posttrain.ppo import NonFiniteError, PPOConfig, PPOTrainer
from posttrain.preference import RewardScorer
from posttrain.recipe import PpoRecipe
from posttrain.rewards import load_prompts, proxy_norm
from posttrain.runs import EXTRA_STATE_FILE, Curve, Run, atomic_dir
from posttrain.sharding import fsdp_modules, gather_whole, shard_frozen, skeleton, state_bytes, whole_weights
from posttrain.templates import stop_ids
from posttrain.training import Progress


def reward_fn_for(recipe: PpoRecipe, scorer: RewardScorer | None, verifier, norm: tuple[float, float]):
    """(rows, answers, stopped) -> {"score", "proxy", "gold"}: what PPO optimises and what it logs."""
    mu, sigma = norm
    rm_w, gold_w = recipe.ppo.rm_weight, recipe.ppo.gold_weight

    def fn(rows: list[dict], answers: list[str], stopped: list[bool]) -> dict:
        out: dict = {}
        score = torch.zeros(len(answers))
        if scorer is not None:
            proxy = (torch.tensor(scorer.score([r["prompt"] for r in rows], answers)) - mu) / sigma
            out["proxy"] = proxy
            score += rm_w * proxy
        if verifier is not None:
            gold = torch.tensor([verifier.score(r, a, s).total for r, a, s in zip(rows, answers, stopped, strict=True)])
            out["gold"] = gold
            score += gold_w * gold
        out["score"] = score
        return out

    return fn


def main(recipe: PpoRecipe, force: bool = False) -> Path:
    p = recipe.ppo
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    if not tok.chat_template:
        raise UserError(f"model.path: {recipe.model.path} has no chat template; PPO starts from a chat model (run SFT first)")
    rows, ids, _ = load_prompts(recipe.data.train, recipe.data.columns, recipe.data.limit, tok, p.max_new_tokens,
                                recipe.data.max_length)
    if len(rows) < p.rollout_batch_size * accelerator.num_processes:
        raise UserError(f"data.train: {len(rows)} prompts, fewer than one rollout batch "
                        f"({p.rollout_batch_size} x {accelerator.num_processes} processes)")
    policy = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)
    check_max_length(policy, recipe.data.max_length)
    ref = None
    if recipe.model.lora:
        from peft import get_peft_model

        torch.manual_seed(recipe.seed)  # the adapter's random init: the same run gives the same model
        policy = get_peft_model(policy, lora_config(recipe.model.lora, "CAUSAL_LM"))
    else:
        ref = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)

    scorer = RewardScorer.load(p.reward_model, accelerator.device) if p.reward_model else None
    verifier = None
    if p.verifier:
        from posttrain.world.verifier import Verifier

        verifier = Verifier.from_dir(p.verifier)
    critic = None
    if p.value_model == "reward":
        if scorer.tok.get_vocab() != tok.get_vocab():
            raise UserError("ppo.value_model: the reward model's tokenizer differs from the policy's, so it cannot be "
                            "the critic (rewards still work, by text); set ppo.value_model: head")
        from transformers import AutoModelForSequenceClassification

        critic = AutoModelForSequenceClassification.from_pretrained(p.reward_model)

    run = Run(recipe).start(force)
    norm = (0.0, 1.0)
    if scorer is not None:
        norm = proxy_norm(scorer, policy, tok, rows[: max(64, p.rollout_batch_size)], p.max_new_tokens, p.temperature,
                          recipe.seed)
    trainer = PPOTrainer(policy, critic, tok, reward_fn_for(recipe, scorer, verifier, norm), PPOConfig.from_recipe(recipe),
                         accelerator=accelerator, ref_policy=ref, stop_ids=stop_ids(tok))
    scorer_structure = None
    if trainer.sharded and scorer is not None:  # the reward model, frozen, is sharded like the reference
        scorer_structure = skeleton(scorer.model) if run.is_main else None
        scorer.model = shard_frozen(scorer.model, accelerator, free_root=False)  # its score head is read after forward

    start = 0
    ckpt = run.rewind() if run.is_main else run.last_checkpoint()
    if ckpt is not None:
        try:
            trainer.load_state_dict(load_weights_only(ckpt / "ppo.pt", "resume", "pass --force to start over"))
        except ValueError as e:  # e.g. written by another number of processes
            raise UserError(f"{ckpt}: {e}; resume it launched the same way, or pass --force to start over") from None
        start = trainer.iteration
    eval_rows = datalib.load(recipe.eval.prompts, limit=recipe.eval.limit).rows if recipe.eval.prompts else []
    order = _prompt_order(len(rows), p.iterations * p.rollout_batch_size * accelerator.num_processes, recipe.seed)
    progress = Progress(p.iterations, "ppo")
    progress.start(p.iterations, start)
    history = [r for r in run.metrics() if "proxy" in r or "gold" in r]
    for it in range(start, p.iterations):
        lo = (it * accelerator.num_processes + accelerator.process_index) * p.rollout_batch_size
        batch = order[lo : lo + p.rollout_batch_size]
        try:
            stats = trainer.train_iteration([rows[i] for i in batch], [ids[i] for i in batch])
        except NonFiniteError as e:
            last = run.last_checkpoint()
            raise UserError(f"{e}; the last good checkpoint is {last or 'none (no checkpoint yet)'}") from None
        if (it + 1) % p.eval_every == 0 and eval_rows and verifier is not None:
            with whole_weights(trainer.wrapper), _whole(scorer):  # sharded: every process gathers, the main one evaluates
                if run.is_main:
                    stats.update(greedy_eval(trainer.policy, tok, eval_rows[:128], verifier, p.max_new_tokens, scorer, norm))
        history.append(stats)
        run.log(it + 1, stats)
        progress.note({"reward": stats.get("proxy", stats["score"]), "gold": stats.get("gold", float("nan")), "kl": stats["kl"]})
        progress.update(it + 1)
        if (it + 1) % recipe.train.save_every == 0 or it + 1 == p.iterations:
            _checkpoint(run, trainer, it + 1, recipe.train.keep_checkpoints, accelerator)
    progress.stop()
    held = _held_bytes(trainer, scorer, accelerator)
    policy = trainer.whole_policy()  # every process joins where the policy is sharded
    if trainer.sharded and scorer is not None:
        scorer.model = gather_whole(scorer.model, scorer_structure, accelerator)
    if not run.is_main:
        return run.dir
    if held is not None:
        run.facts["training_state_bytes"] = held
    if trainer.sharded:
        run.facts["fsdp_modules"] = fsdp_modules(trainer.wrapper)  # the policy's and the critic's blocks

    summary: dict = {"iterations": p.iterations, "prompts": len(rows), "lora": recipe.model.lora is not None,
                     "reward": _reward_name(recipe), "proxy_norm_mean": norm[0], "proxy_norm_std": norm[1]}
    last = history[-min(len(history), 5):]
    for key in ("score", "proxy", "gold", "kl", "response_length", "stop_rate"):
        if all(key in h for h in last):
            summary[f"final_{key}"] = sum(h[key] for h in last) / len(last)
    if "final_kl" in summary:  # a mean of noisy per-batch estimates; the KL itself is never negative
        summary["final_kl"] = max(0.0, summary["final_kl"])
    seconds = {k: sum(h.get(f"time_{k}", 0) for h in history) for k in ("generate", "score", "forward", "train")}
    summary["time_generate_fraction"] = seconds["generate"] / max(sum(seconds.values()), 1e-9)  # of the iterations' time
    if scorer is not None and verifier is not None:
        check = check_history(history, p.monitor)
        summary["reward_hacking"] = check.flagged
        summary["reward_hacking_iteration"] = check.iteration + 1 if check.flagged else None
        summary["reward_hacking_reason"] = check.reason
        if check.flagged:
            print(f"REWARD HACKING at iteration {check.iteration + 1}: {check.reason}")
    if trainer.sharded and ref is not None:  # the frozen copy is sharded: the main process reloads it whole
        ref = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)
    if eval_rows:
        result = evaluate_prompts(policy, tok, recipe.eval, run.dir)
        summary.update(result.metrics)
        if scorer is not None:
            raw = scorer.score([r["prompt"] for r in result.rows], [g.text for g in result.gens])
            summary["eval_proxy"] = (sum(raw) / len(raw) - norm[0]) / norm[1]
        summary.update(kl_summary(policy_kl(policy, ref, tok, result.rows, max_new_tokens=p.max_new_tokens, seed=recipe.seed)))

    notes = (f"`{recipe.model.path}` optimised with PPO for {p.iterations} iterations against {summary['reward']}. "
             "See plots/ for the proxy and gold reward, KL and the other PPO curves.")
    return run.finish(summary, title="PPO policy", notes=notes, save=policy.save_pretrained, tokenizer=tok, curves=CURVES)


def _whole(scorer: RewardScorer | None):
    """whole_weights for the reward model, sharded or not (a no-op without one)."""
    return whole_weights(scorer.model) if scorer is not None else contextlib.nullcontext()


def _held_bytes(trainer: PPOTrainer, scorer: RewardScorer | None, accelerator: Accelerator) -> dict | None:
    """Bytes each process held for training (PPOTrainer state_bytes: parameters, gradients, optimizer
    state, the frozen reference; plus the reward model, sharded like them under FSDP2), of the process that
    held the most, with their total and the process count; None before any optimizer step. Every
    process must call it; the main one gets the answer."""
    from accelerate.utils import gather_object

    held = dict(trainer.state_bytes or {})
    if held and scorer is not None:
        held["reward_model"] = state_bytes(scorer.model, None)["params"]  # this process's shards under FSDP2
    rows = gather_object([held]) if accelerator.num_processes > 1 else [held]
    if not rows[0]:
        return None
    top = max(rows, key=lambda r: sum(r.values()))
    return {**top, "total": sum(top.values()), "processes": len(rows)}


def _prompt_order(n: int, needed: int, seed: int) -> list[int]:
    """Prompt indices for the whole run: reshuffled passes over the prompts, as many as needed."""
    rng, order = random.Random(seed), []
    while len(order) < needed:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return order


def _checkpoint(run: Run, trainer: PPOTrainer, iteration: int, keep: int, accelerator: Accelerator) -> None:
    """Write checkpoint-N atomically and keep the newest `keep`."""
    state = trainer.state_dict()  # every process: it gathers the RNG states
    if run.is_main:
        with atomic_dir(run.checkpoints / f"checkpoint-{iteration}") as tmp:
            torch.save(state, tmp / "ppo.pt")
            (tmp / "iteration").write_text(f"{iteration}\n")
            (tmp / EXTRA_STATE_FILE).write_text(json.dumps({"processes": accelerator.num_processes}) + "\n")
        done = sorted(run.checkpoints.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _reward_name(recipe: PpoRecipe) -> str:
    p = recipe.ppo
    parts = []
    if p.reward_model:
        parts.append(f"{p.rm_weight:g} x reward model {p.reward_model}")
    if p.gold_weight:
        parts.append(f"{p.gold_weight:g} x gold verifier")
    return " + ".join(parts)


CURVES = [
    Curve(["proxy", "gold", "eval_proxy", "eval_gold"], "reward.png", "proxy (reward model) vs gold reward"),
    Curve(["kl", "kl_coef"], "kl.png", "KL to the reference (per answer)"),
    Curve(["entropy", "approx_kl", "clip_fraction", "value_clip_fraction"], "policy.png", "policy update"),
    Curve(["value_loss", "explained_variance"], "value.png", "critic"),
    Curve(["response_length", "stop_rate"], "length.png", "answers"),
    Curve(["time_generate", "time_score", "time_forward", "time_train"], "time.png", "seconds per iteration", "s"),
]
