"""Classification fine-tuning: a pretrained GPT as a text feature extractor.

Reads:  model.path (any causal LM checkpoint), data.train / data.eval (text + label columns, names in
        classify.text_column / label_column), classify.test, classify.split (seeded val/test carved
        from data.train when those files are absent), classify.trainable, classify.group_by_length,
        data.max_length, train.*
Writes: a sequence-classification model (labels in config.id2label; with trainable: lora merged,
        the adapter kept in adapter/), confusion matrix PNG, test_predictions.jsonl, and the usual run files.
Reports: accuracy, macro-F1, per-class precision/recall, the confusion matrix, and the accuracy of
        the untrained head for reference.

A linear head reads the hidden state of the last real token, the only position that has seen the
whole text in a causal model; that position comes from the attention mask (models.last_token_logits),
so a tokenizer that pads with its end token (or has no pad token) needs nothing added. A LoRA run as
model.path is merged into its base first.
`trainable` picks what learns: head (a linear probe), last_blocks:N (plus the top N blocks), lora, all.
`group_by_length` batches texts of similar length (the shuffled data is cut into groups of up to 50
batches and each group sorted by length): far less padding when lengths vary a lot, at the price of
less mixed batches (on SMS spam, long texts are mostly spam).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from posttrain import data as datalib
from posttrain.errors import UserError
from posttrain.metrics import classification_report, confusion_matrix
from posttrain.models import check_max_length, last_token_logits, load_tokenizer, lora_config, sequence_classifier
from posttrain.plots import confusion
from posttrain.recipe import ClassifyRecipe, LoraConfig
from posttrain.runs import Curve, Run
from posttrain.sharding import unshard
from posttrain.training import build_trainer, fit, trainer_kwargs


def load_splits(recipe: ClassifyRecipe) -> dict[str, datalib.Table]:
    """train/val/test tables; missing ones are carved out of data.train with a seeded shuffle."""
    c = recipe.classify
    names = {"text": c.text_column, "label": c.label_column}
    train = datalib.load(recipe.data.train, recipe.data.columns)
    datalib.validate(train, "classification", names)
    splits = {"val": datalib.load(recipe.data.eval, recipe.data.columns) if recipe.data.eval else None,
              "test": datalib.load(c.test, recipe.data.columns) if c.test else None}
    order = list(range(len(train)))
    random.Random(recipe.seed).shuffle(order)
    for name, fraction in (("test", c.split.test), ("val", c.split.val)):
        if splits[name] is None:
            n = round(len(order) * fraction)
            if n == 0:
                raise UserError(f"classify.split.{name}: no {name} file and a split of 0; give one or the other")
            # the rest of the n held-out records stay out of training all the same
            keep = datalib.heldout_size(n, recipe.data.limit, fraction, 1 - c.split.test - c.split.val)
            splits[name], order = train.select(sorted(order[:keep])), order[n:]
        else:
            datalib.validate(splits[name], "classification", names)
    splits["train"] = train.select(sorted(order)).head(recipe.data.limit)
    return splits


def make_trainable(model, trainable: str, lora):
    """Leave only what `trainable` names with gradients (the head always learns). Returns the model
    (a peft model for lora, with the head fully trained beside the adapters)."""
    if trainable == "all":
        return model
    if trainable == "lora":
        from peft import get_peft_model

        return get_peft_model(model, lora_config(lora or LoraConfig(), "SEQ_CLS"))
    for p in model.parameters():
        p.requires_grad = False
    for p in model.score.parameters():
        p.requires_grad = True
    if trainable.startswith("last_blocks:"):
        n = int(trainable.split(":")[1])
        body = model.base_model
        blocks = body.h if hasattr(body, "h") else body.layers
        if n > len(blocks):
            raise UserError(f"classify.trainable: the model has {len(blocks)} blocks, fewer than {n}")
        final_norm = next((getattr(body, k) for k in ("ln_f", "norm", "final_layer_norm") if hasattr(body, k)), None)
        for module in [*blocks[-n:], *([final_norm] if final_norm is not None else [])]:
            for p in module.parameters():
                p.requires_grad = True
    return model


@torch.no_grad()
def untrained_accuracy(model, tok, ds: Dataset, batch_size: int = 64) -> float:
    """Test accuracy of the untrained head, computed outside the Trainer: Trainer.predict before
    Trainer.train under `accelerate launch` wraps the model in DDP once for prediction and again for
    training (transformers/trainer.py evaluation_loop prepares a model the accelerator has not
    seen), and the processes' updates then no longer match a single process's."""
    collate, device, was = DataCollatorWithPadding(tok), next(model.parameters()).device, model.training
    model.eval()
    hits = 0
    for i in range(0, len(ds), batch_size):
        batch = collate(ds.select(range(i, min(i + batch_size, len(ds)))).to_list())
        labels = batch.pop("labels")
        logits = last_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        hits += int((logits.argmax(-1).cpu() == labels).sum())
    model.train(was)
    return hits / len(ds)


class LastTokenTrainer(Trainer):
    """The Trainer with the head read at the last real token by the attention mask (the HF head searches
    for the pad id) and a plain mean cross-entropy over this process's batch, which is what the HF
    head computes too."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = last_token_logits(model, inputs["input_ids"], inputs["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


def main(recipe: ClassifyRecipe, force: bool = False) -> Path:
    c = recipe.classify
    splits = load_splits(recipe)
    labels = sorted({str(r[c.label_column]) for r in splits["train"]})
    if len(labels) < 2:
        raise UserError(f"{recipe.data.train}: only one label ({labels[0]!r}) in the training data; need at least two")
    label2id = {name: i for i, name in enumerate(labels)}
    for split in ("val", "test"):
        table = splits[split]
        for i, r in enumerate(table):
            if str(r[c.label_column]) not in label2id:
                raise UserError(f"{table.where(i)}: label {r[c.label_column]!r} never appears in the training data "
                                f"(labels: {', '.join(labels)}); fix the label or add training examples")

    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # harmless: the head reads the last real token by the attention mask
    torch.manual_seed(recipe.seed)
    model = sequence_classifier(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tok,
                                num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)
    check_max_length(model, recipe.data.max_length)
    model = make_trainable(model, c.trainable, recipe.model.lora)

    def encode(table: datalib.Table) -> tuple[Dataset, int]:
        enc = tok([str(r[c.text_column]) for r in table], truncation=True, max_length=recipe.data.max_length)
        full = tok([str(r[c.text_column]) for r in table])["input_ids"]
        n_cut = sum(len(f) > recipe.data.max_length for f in full)
        ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                "labels": [label2id[str(r[c.label_column])] for r in table]})
        return ds, n_cut

    (train_ds, cut_train), (val_ds, cut_val), (test_ds, cut_test) = map(encode, (splits["train"], splits["val"], splits["test"]))
    truncated = cut_train + cut_val + cut_test
    if truncated:
        print(f"note: {truncated} texts are longer than data.max_length={recipe.data.max_length}: truncated (start kept)")

    run = Run(recipe).start(force)
    args = TrainingArguments(**trainer_kwargs(recipe, run, eval_strategy="epoch" if not recipe.train.eval_every else "steps",
                                              per_device_eval_batch_size=64,
                                              train_sampling_strategy="group_by_length" if c.group_by_length else "random"))
    trainer = build_trainer(
        LastTokenTrainer, run, model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=DataCollatorWithPadding(tok), processing_class=tok,
        compute_metrics=lambda p: classification_report(p.label_ids.tolist(), p.predictions.argmax(-1).tolist(), labels),
    )
    # LastTokenTrainer's loss is a plain per-process mean; told that the model accepts loss kwargs, the
    # Trainer would treat it as a global sum and multiply it by the number of processes (and skip
    # dividing by train.grad_accum) (transformers/trainer.py compute_loss, training_step).
    trainer.model_accepts_loss_kwargs = False
    before = untrained_accuracy(trainer.model, tok, test_ds) if run.is_main else None
    train_metrics = fit(trainer, run)
    # predict and evaluate gather over every process: all of them call these, then only rank 0 writes
    pred = trainer.predict(test_ds)
    val_accuracy = trainer.evaluate()["eval_accuracy"]
    unshard(trainer, run)  # every process; under FSDP rank 0 gets the whole model as trainer.model
    if not run.is_main:
        return run.dir

    y_true, y_pred = pred.label_ids.tolist(), pred.predictions.argmax(-1).tolist()
    report = classification_report(y_true, y_pred, labels)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    summary = {
        "labels": ",".join(labels), "train_examples": len(train_ds), "val_examples": len(val_ds),
        "test_examples": len(test_ds), "truncated": truncated, "trainable": c.trainable,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "test_accuracy_before": before, "train_loss": train_metrics.get("train_loss"),
        **{f"test_{k}": v for k, v in report.items()},
        "val_accuracy": val_accuracy,
    }
    run.log(trainer.state.global_step, {"test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"]})
    with (run.dir / "test_predictions.jsonl").open("w") as f:
        for r, p in zip(splits["test"], y_pred, strict=True):
            f.write(json.dumps({"text": r[c.text_column], "label": str(r[c.label_column]), "predicted": labels[p]}) + "\n")
    confusion(matrix, labels, run.plots_dir() / "confusion_matrix.png", f"test confusion matrix (accuracy {report['accuracy']:.3f})")

    def save(out: str) -> None:
        if c.trainable == "lora":  # saved merged, a standard classifier; the adapter (and the head) kept in adapter/
            trainer.save_model(f"{out}/adapter")
            trainer.model.merge_and_unload().save_pretrained(out)
        else:
            trainer.save_model(out)

    _print_confusion(matrix, labels)
    notes = (f"`{recipe.model.path}` with a classification head on the last real token ({c.trainable} trainable), "
             f"fine-tuned on `{recipe.data.train}`. Labels: {', '.join(labels)}.")
    return run.finish(summary, title="Text classifier", notes=notes, save=save, tokenizer=tok,
                      curves=[Curve(["loss", "eval_loss"], "loss.png", "classification loss", "cross-entropy")])


def _print_confusion(matrix: list[list[int]], labels: list[str]) -> None:
    width = max(8, *(len(x) for x in labels)) + 2
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{x:>{width}}" for x in labels))
    for name, row in zip(labels, matrix, strict=True):
        print(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))

