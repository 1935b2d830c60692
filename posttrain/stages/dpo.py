"""Direct preference optimisation (DPO), with TRL's DPOTrainer.

Reads:  model.path (usually the SFT run; it is also the reference), model.lora, data.train /
        data.eval (preference pairs), data.max_length, dpo.* (beta, loss_type, sft_weight, precompute_ref,
        overlong, eval_split: a seeded held-out part of data.train when there is no data.eval),
        train.*, eval.* (prompts and the world's verifier).
Writes: the aligned model (or a LoRA adapter), eval_answers.jsonl, and the usual run files.
Reports: held-out preference accuracy and reward margins, KL(DPO policy || reference) on the eval
        prompts, and with the world's verifier the gold metrics of greedy answers before (the
        reference) and after, with their differences.

The reference model is the starting policy. With LoRA it is the same model with the adapter
switched off, so no second copy is loaded; with dpo.precompute_ref the reference log-probs are
computed once before training and no reference is kept at all.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from posttrain.evaluate import answer_logprobs, evaluate_prompts, kl_summary, policy_kl
from posttrain.lm_head import use_full_logits_on_cpu
from posttrain.metrics import pairwise
from posttrain.models import check_max_length, expose_head_bias, load_start_model, load_tokenizer, lora_config
from posttrain.preference import fit_length, load_train_eval
from posttrain.recipe import DpoRecipe
from posttrain.runs import Curve, Run
from posttrain.sharding import unshard
from posttrain.templates import pad_id
from posttrain.training import build_trainer, fit, trainer_kwargs


def _dataset(pairs: list[dict], kept: list) -> Dataset:
    return Dataset.from_list([{k: pairs[i][k] for k in ("prompt", "chosen", "rejected")} for *_, i in kept])


def logprob_preference(model, tok, kept: list) -> dict:
    """How often the model itself gives the chosen answer a higher log-probability than the rejected one
    (summed over answer tokens), and the mean difference, on (prompt, chosen, rejected) token ids."""
    was = model.training
    model.eval()
    chosen = answer_logprobs(model, [(p, c) for p, c, _, _ in kept], pad_id(tok))
    rejected = answer_logprobs(model, [(p, r) for p, _, r, _ in kept], pad_id(tok))
    model.train(was)
    m = pairwise(chosen, rejected)
    return {"logprob_accuracy": m["accuracy"], "logprob_margin": m["mean_margin"]}


def main(recipe: DpoRecipe, force: bool = False) -> Path:
    (train_pairs, counts), (eval_pairs, eval_counts) = load_train_eval(recipe.data, recipe.dpo.eval_split, recipe.seed,
                                                                      "dpo.eval_split")
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    max_length, overlong = recipe.data.max_length, recipe.dpo.overlong
    train_kept, len_stats = fit_length(tok, train_pairs, max_length, overlong, "train")
    eval_kept, eval_len_stats = fit_length(tok, eval_pairs, max_length, overlong, "eval") if eval_pairs else ([], {})
    model = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)
    check_max_length(model, max_length)
    # A frozen copy is the reference only for full fine-tuning without precomputed log-probs.
    ref = None
    if not recipe.model.lora and not recipe.dpo.precompute_ref:
        ref = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)

    run = Run(recipe).start(force)
    summary: dict = {**{f"train_{k}": v for k, v in counts.items()}, **{f"eval_{k}": v for k, v in eval_counts.items()},
                     **len_stats, **eval_len_stats, "beta": recipe.dpo.beta, "loss_type": recipe.dpo.loss_type,
                     "sft_weight": recipe.dpo.sft_weight,
                     "lora": recipe.model.lora is not None, "reference": "adapter disabled" if recipe.model.lora
                     else "precomputed log-probs" if recipe.dpo.precompute_ref else "frozen copy"}
    before = {}
    # DPO's implicit-reward accuracy is 0 before training (policy == reference), so the figure that
    # shows what DPO changed is the policy's own ranking: log p(chosen) > log p(rejected)?
    if eval_kept and run.is_main:
        summary.update({f"eval_{k}_before": v for k, v in logprob_preference(model, tok, eval_kept).items()})
    if recipe.eval.prompts and run.is_main:
        print("reference model (before DPO) on the eval prompts:")
        before = evaluate_prompts(model, tok, recipe.eval, run.dir).metrics
        (run.dir / "eval_answers.jsonl").rename(run.dir / "eval_answers_before.jsonl")

    losses, weights = [recipe.dpo.loss_type], [1.0]
    if recipe.dpo.sft_weight > 0:
        losses, weights = losses + ["sft"], weights + [recipe.dpo.sft_weight]
    args = DPOConfig(**trainer_kwargs(recipe, run, beta=recipe.dpo.beta, loss_type=losses, loss_weights=weights,
                                      max_length=max_length, precompute_ref_log_probs=recipe.dpo.precompute_ref,
                                      disable_dropout=True))
    trainer = build_trainer(
        DPOTrainer, run, model=model, ref_model=ref, args=args,
        train_dataset=_dataset(train_pairs, train_kept),
        eval_dataset=_dataset(eval_pairs, eval_kept) if eval_kept else None,
        processing_class=tok, peft_config=lora_config(recipe.model.lora, "CAUSAL_LM") if recipe.model.lora else None,
    )
    if recipe.model.lora:
        expose_head_bias(trainer.model)
    use_full_logits_on_cpu(trainer.model, trainer.ref_model)
    train_metrics = fit(trainer, run)
    ev = trainer.evaluate() if eval_kept else {}  # every process (it gathers)
    # every process; under FSDP rank 0 gets the whole model as trainer.model, and reloads the reference below
    sharded = unshard(trainer, run)
    if not run.is_main:
        return run.dir

    policy = trainer.model
    summary["train_loss"] = train_metrics.get("train_loss")
    if eval_kept:
        summary["eval_preference_accuracy"] = ev.get("eval_rewards/accuracies")
        summary["eval_reward_margin"] = ev.get("eval_rewards/margins")
        summary["eval_loss"] = ev.get("eval_loss")
        run.log(trainer.state.global_step, {"eval_preference_accuracy": summary["eval_preference_accuracy"]})
        summary.update({f"eval_{k}": v for k, v in logprob_preference(policy, tok, eval_kept).items()})
    if recipe.eval.prompts:
        print("DPO model on the eval prompts:")
        result = evaluate_prompts(policy, tok, recipe.eval, run.dir)
        after, rows = result.metrics, result.rows
        summary.update(after)
        summary.update({f"ref_{k}": v for k, v in before.items() if k != "eval_prompts"})
        for k in ("gold_score", "fact_accuracy", "refusal_rate", "over_refusal_rate", "format_rate", "sycophancy_rate"):
            if k in after and k in before:
                summary[f"delta_{k}"] = after[k] - before[k]
        reference = ref  # None with LoRA: the policy with its adapter off
        if (ref is None or sharded) and not recipe.model.lora:  # precomputed log-probs, or a sharded copy: reload
            reference = load_start_model(recipe.model.path, "float32", tokenizer=tok)
        summary.update(kl_summary(policy_kl(
            policy, reference, tok, rows, max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
            seed=recipe.seed)))

    notes = (f"`{recipe.model.path}` aligned with DPO ({recipe.dpo.loss_type}, beta {recipe.dpo.beta}) on "
             f"`{recipe.data.train}`; reference: {summary['reference']}.")
    return run.finish(summary, title="DPO model", notes=notes, save=trainer.save_model, tokenizer=tok, curves=[
        Curve(["loss", "eval_loss"], "loss.png", "DPO loss", "loss"),
        Curve(["rewards/accuracies", "rewards/margins"], "rewards.png", "DPO implicit rewards (train)")])
