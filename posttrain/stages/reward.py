"""Reward modelling on preference pairs, with TRL's RewardTrainer.

Reads:  model.path (usually the SFT run), data.train / data.eval (preference pairs: conversational,
        strings, or Alpaca-style), data.max_length, reward.* (overlong, center_rewards, gold_pairs,
        policy, eval_split: a seeded held-out part of data.train when there is no data.eval,
        extra_layers: GPT-2 blocks added on top, starting as the identity),
        train.*, eval.* (prompts and the world's verifier for the gold check).
Writes: a sequence-classification model with one output (the reward), loadable with
        AutoModelForSequenceClassification (a LoRA run is merged into it; the adapter is kept in
        adapter/), score_histogram.png, and the usual run files.
Reports: held-out pairwise accuracy and mean margin, pairs skipped or cut, and on the world how
        often the reward model ranks two fresh answers of the policy the way the gold verifier does.

The score is read at the last real token of prompt + answer, located by the attention mask
(models.last_token_logits), so a padded batch scores a text exactly as it scores alone, and a
tokenizer whose pad token is its end token (Llama, Qwen, Mistral, GPT-2) needs nothing added: the
end-of-turn token that closes every answer is where the score is read. A LoRA run as model.path is
merged into its base first.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from posttrain import data as datalib
from posttrain.evaluate import answer
from posttrain.metrics import agreement, pairwise
from posttrain.models import (
    add_blocks,
    check_max_length,
    last_token_logits,
    load_start_model,
    load_tokenizer,
    lora_config,
    sequence_classifier,
)
from posttrain.plots import histogram
from posttrain.preference import RewardScorer, fit_length, load_train_eval
from posttrain.recipe import RewardRecipe
from posttrain.runs import Curve, Run
from posttrain.sharding import unshard
from posttrain.training import build_trainer, fit, trainer_kwargs


def gold_agreement(recipe: RewardRecipe, scorer: RewardScorer) -> dict:
    """Sample two answers per eval prompt from the policy; of the pairs the gold verifier ranks,
    how many the reward model ranks the same way."""
    from posttrain.world.verifier import Verifier

    rows = datalib.load(recipe.eval.prompts, limit=recipe.reward.gold_pairs).rows
    policy_path = recipe.reward.policy or recipe.model.path
    tok = load_tokenizer(policy_path)
    policy = load_start_model(policy_path, dtype="float32", tokenizer=tok)
    kw = dict(max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size, temperature=1.0)
    a = answer(policy, tok, rows, seed=recipe.seed, **kw)
    b = answer(policy, tok, rows, seed=recipe.seed + 1, **kw)
    verifier = Verifier.from_dir(recipe.eval.verifier)
    gold = [verifier.score(r, g.text, g.stopped).total for r, g in zip(rows + rows, a + b, strict=True)]
    prompts = [r["prompt"] for r in rows]
    rm = scorer.score(prompts + prompts, [g.text for g in a + b])
    n = len(rows)
    pairs = [(i, i + n) for i in range(n)]
    decided = sum(gold[i] != gold[j] for i, j in pairs)
    return {"gold_agreement": agreement(rm, gold, pairs), "gold_pairs_sampled": n, "gold_pairs_decided": decided}


class LastTokenRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with the score read at the last real token by the attention mask (TRL reads
    the HF head, which searches for the pad id)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        def scored(input_ids, attention_mask, **_):
            return SimpleNamespace(logits=last_token_logits(model, input_ids, attention_mask))

        return super().compute_loss(scored, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def main(recipe: RewardRecipe, force: bool = False) -> Path:
    (train_pairs, counts), (eval_pairs, eval_counts) = load_train_eval(recipe.data, recipe.reward.eval_split, recipe.seed,
                                                                      "reward.eval_split")
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # harmless: the score is read by the attention mask
    max_length, overlong = recipe.data.max_length, recipe.reward.overlong
    train_ids, len_stats = fit_length(tok, train_pairs, max_length, overlong, "train")
    eval_ids, eval_len_stats = fit_length(tok, eval_pairs, max_length, overlong, "eval") if eval_pairs else ([], {})

    def dataset(ids):
        return Dataset.from_dict({"chosen_ids": [p + c for p, c, _, _ in ids], "rejected_ids": [p + r for p, _, r, _ in ids]})

    torch.manual_seed(recipe.seed)  # the new score head's initialisation
    model = sequence_classifier(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tok, num_labels=1)
    add_blocks(model, recipe.reward.extra_layers)
    check_max_length(model, max_length)

    run = Run(recipe).start(force)
    args = RewardConfig(**trainer_kwargs(recipe, run, max_length=None, disable_dropout=True,
                                         center_rewards_coefficient=recipe.reward.center_rewards))
    peft_config = lora_config(recipe.model.lora, "SEQ_CLS") if recipe.model.lora else None
    trainer = build_trainer(LastTokenRewardTrainer, run, model=model, args=args, train_dataset=dataset(train_ids),
                            eval_dataset=dataset(eval_ids) if eval_ids else None, processing_class=tok,
                            peft_config=peft_config)
    before = {}
    if eval_ids and run.is_main:  # the untrained head, for reference (no RNG is drawn: the training is unchanged)
        untrained = RewardScorer(trainer.model, tok)
        before = pairwise(untrained.score_ids([p + c for p, c, _, _ in eval_ids]),
                          untrained.score_ids([p + r for p, _, r, _ in eval_ids]))
    train_metrics = fit(trainer, run)
    unshard(trainer, run)  # every process; under FSDP rank 0 gets the whole model as trainer.model
    if not run.is_main:
        return run.dir

    model = trainer.model
    if recipe.model.lora:
        trainer.save_model(str(run.dir / "adapter"))
        model = model.merge_and_unload()
    model.eval()
    scorer = RewardScorer(model, tok)
    summary: dict = {**{f"train_{k}": v for k, v in counts.items()}, **{f"eval_{k}": v for k, v in eval_counts.items()},
                     **len_stats, **eval_len_stats, "lora": recipe.model.lora is not None,
                     "train_loss": train_metrics.get("train_loss")}
    if eval_ids:
        chosen = scorer.score_ids([p + c for p, c, _, _ in eval_ids])
        rejected = scorer.score_ids([p + r for p, _, r, _ in eval_ids])
        summary.update({f"eval_{k}": v for k, v in pairwise(chosen, rejected).items()})
        summary.update({f"eval_{k}_before": v for k, v in before.items()})
        flaws = [eval_pairs[i].get("flaw") for *_, i in eval_ids]
        for flaw in sorted({f for f in flaws if f}):  # which kinds of bad answer the model cannot tell apart
            idx = [j for j, f in enumerate(flaws) if f == flaw]
            summary[f"eval_accuracy_{flaw}"] = pairwise([chosen[j] for j in idx], [rejected[j] for j in idx])["accuracy"]
        summary["eval_chosen_mean"] = sum(chosen) / len(chosen)
        summary["eval_rejected_mean"] = sum(rejected) / len(rejected)
        run.log(trainer.state.global_step, {"eval_pairwise_accuracy": summary["eval_accuracy"]})
        histogram({"chosen": chosen, "rejected": rejected}, run.plots_dir() / "score_histogram.png",
                  f"held-out reward scores (pairwise accuracy {summary['eval_accuracy']:.3f})", "reward")
    if recipe.eval.prompts and recipe.eval.verifier and recipe.reward.gold_pairs:
        summary.update(gold_agreement(recipe, scorer))

    shutil.rmtree(run.dir / "adapter" / "checkpoints", ignore_errors=True)
    notes = (f"A reward model (sequence classification, one output) initialised from `{recipe.model.path}` and trained "
             f"on `{recipe.data.train}`. Load it with `AutoModelForSequenceClassification.from_pretrained('{run.dir}')`.")
    return run.finish(summary, title="Reward model", notes=notes, save=model.save_pretrained, tokenizer=tok,
                      curves=[Curve(["loss", "eval_loss"], "loss.png", "reward model loss", "pairwise loss")])
