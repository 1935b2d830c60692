"""Supervised fine-tuning (SFT) with a chat template and loss masking, on TRL's SFTTrainer.

Reads:  model.path (+ model.chat_template, model.lora), data.train / data.eval (messages,
        prompt_completion, alpaca or text), data.max_length, sft.loss / overlong / merge, train.*,
        eval.* (prompts to answer, the world's verifier, fact probes).
Writes: the fine-tuned model (or a LoRA adapter, plus merged/ with sft.merge), eval_answers.jsonl,
        and the usual run files.
Reports: eval loss, trained-token and padding fractions, and on the eval prompts: how often the
        model stops by itself in format, the gold metrics, and how many held-out facts (people never
        seen in chat) it still answers compared with the starting model's raw-text recall.

The loss mask comes from posttrain/render.py (the same code `posttrain show-mask` prints); TRL gets
ready token ids and labels and does packing, LoRA and the training loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from posttrain import data as datalib
from posttrain.errors import UserError
from posttrain.evaluate import evaluate_prompts, fact_recall
from posttrain.lm_head import use_full_logits_on_cpu
from posttrain.models import (
    attach_chat_template,
    check_max_length,
    expose_head_bias,
    load_causal_lm,
    load_start_model,
    load_tokenizer,
    lora_config,
    merge_adapter,
    use_own_template,
)
from posttrain.recipe import SftRecipe
from posttrain.render import check_loss_mode, default_loss, mask_source, render
from posttrain.runs import Curve, Run
from posttrain.sharding import unshard
from posttrain.templates import pad_id
from posttrain.training import build_trainer, fit, trainer_kwargs

FORMATS = ("messages", "prompt_completion", "alpaca", "text")


def load_examples(recipe: SftRecipe, path: str, limit: int | None) -> tuple[list[dict], str]:
    """Rows of one data file, checked and reduced to the fields their format trains on."""
    table = datalib.load(path, recipe.data.columns, limit)
    fmt = recipe.data.format if recipe.data.format != "auto" else datalib.infer_format(table, FORMATS)
    if fmt not in FORMATS:
        raise UserError(f"data.format: sft reads {', '.join(FORMATS)}, not {fmt}")
    datalib.validate(table, fmt)
    if fmt == "alpaca":
        return [{"messages": datalib.alpaca_to_messages(r)} for r in table], "messages"
    return [{k: r[k] for k in datalib.FIELDS[fmt]} for r in table], fmt


def encode(tok, rows: list[dict], fmt: str, mode: str, max_length: int, overlong: str, name: str) -> tuple[Dataset, dict]:
    """Token ids and labels (-100 = not trained) for every example, with over-long ones dropped or
    truncated as the recipe says, and counted either way."""
    ids_all, labels_all, n_long, n_empty = [], [], 0, 0
    for k, row in enumerate(rows):
        try:
            ids, mask = render(tok, row, fmt, mode)
        except UserError as e:
            raise UserError(f"data.{name} example {k + 1}: {e}") from None
        if len(ids) > max_length:
            n_long += 1
            if overlong == "drop":
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            n_empty += 1  # e.g. truncation cut off every assistant token
            continue
        ids_all.append(ids)
        labels_all.append([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    if not ids_all and n_empty and not n_long:
        raise UserError(f"data.{name}: no example has a token to train on: the chat template renders none of the "
                        f"answers (check model.chat_template) or sft.loss {mode} masks them all")
    if not ids_all:
        raise UserError(f"data.{name}: no example left to train on: {n_long} of {len(rows)} are longer than "
                        f"data.max_length={max_length} ({overlong}); raise data.max_length")
    stats = {f"{name}_examples": len(ids_all), f"{name}_{'dropped' if overlong == 'drop' else 'truncated'}_overlong": n_long,
             f"{name}_dropped_untrained": n_empty}
    if n_long:
        print(f"note: {n_long} of {len(rows)} {name} examples are longer than data.max_length={max_length}: "
              f"{'dropped' if overlong == 'drop' else 'truncated'}")
    return Dataset.from_dict({"input_ids": ids_all, "labels": labels_all}), stats


@torch.no_grad()
def packing_is_exact(model) -> bool:
    """Padding-free packing is right only if the model keeps packed sequences apart (position ids
    restart and attention stays inside each sequence). Check it on the real model: two sequences
    packed into one row must give the same logits as each on its own."""
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = torch.randint(0, vocab, (1, 5), generator=g), torch.randint(0, vocab, (1, 7), generator=g)
    was = model.training
    model.eval()
    alone = torch.cat([model(input_ids=a, use_cache=False).logits, model(input_ids=b, use_cache=False).logits], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=pos, use_cache=False).logits
    model.train(was)
    return torch.allclose(alone, packed, atol=1e-4)


class PackedRows:
    """Collates BFD-packed rows as rows. Each row's sequences get position ids that restart at every
    sequence and no attention mask, so the model keeps attention inside each sequence
    (transformers/masking_utils.py find_packed_sequence_indices reads the sequences off the position
    ids, row by row). TRL's padding-free collator instead joins the whole batch into one row, and on a
    CPU, without a variable-length attention kernel, attention then spans batch x max_length
    positions: 8 rows of 128 cost 1024^2 instead of 8 x 128^2, and a step took 1.6x as long."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        positions = torch.zeros_like(ids)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f.get("labels", f["input_ids"]))
            lengths = list(f.get("seq_lengths") or [n])
            positions[row] = torch.cat([torch.arange(k) for k in lengths + [width - n]])  # padding: a sequence of its own
        labels[positions == 0] = -100  # a sequence's first token is not predicted from the one before it
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that counts the padding in its training batches (the summary's padding_fraction;
    counted per step and kept in checkpoints, so a resumed run reports what an uninterrupted one
    does). Fed by PackedRows it also counts the real tokens: TRL counts a batch without an attention
    mask (the logged num_tokens) as the length of its single padding-free row, here one row of many."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state = {"padded": 0, "computed": 0}  # saved beside each checkpoint (posttrain/training.py)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training, before = self.model.training, self._total_train_tokens
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if training:
            ids = inputs["input_ids"]
            padded = inputs["attention_mask"] == 0 if "attention_mask" in inputs else ids == self.processing_class.pad_token_id
            self.extra_state["padded"] += int(padded.sum())
            self.extra_state["computed"] += ids.numel()
            if "attention_mask" not in inputs:
                real = (~padded).sum()
                self._total_train_tokens = before + self.accelerator.gather_for_metrics(real).sum().item()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out

    @property
    def padding_fraction(self) -> float:
        return self.extra_state["padded"] / self.extra_state["computed"] if self.extra_state["computed"] else 0.0


def heldout_retention(recipe: SftRecipe, rows: list[dict], scores: list) -> dict:
    """Held-out people were never in chat data. Compare the fine-tuned model's answers to plain
    questions about them with the starting model's raw-text recall of the same facts."""
    facts = [(r, s) for r, s in zip(rows, scores, strict=True) if r.get("kind") == "fact" and r.get("group") == "heldout"]
    if not facts or not recipe.eval.probe:
        return {}
    probes = {(p["person"], p["attribute"]): p for p in datalib.load(recipe.eval.probe)}
    probe_rows = [probes[(r["person"], r["attribute"])] for r, _ in facts]
    base_tok = load_tokenizer(recipe.model.path)
    base = load_causal_lm(recipe.model.path, dtype="float32", tokenizer=base_tok)
    hits = fact_recall(base, base_tok, probe_rows)["hits"]
    accuracy = sum(s.correct for _, s in facts) / len(facts)
    recall = sum(hits) / len(hits)
    known = [s.correct for (_, s), h in zip(facts, hits, strict=True) if h]
    return {
        "heldout_facts": len(facts),
        "base_heldout_recall": recall,
        "heldout_accuracy": accuracy,
        "heldout_retention": accuracy / recall if recall else 0.0,
        "heldout_accuracy_on_known": sum(known) / len(known) if known else 0.0,
    }


def main(recipe: SftRecipe, force: bool = False) -> Path:
    train_rows, fmt = load_examples(recipe, recipe.data.train, recipe.data.limit)
    eval_rows, eval_fmt = load_examples(recipe, recipe.data.eval, None) if recipe.data.eval else ([], fmt)
    if eval_fmt != fmt:
        raise UserError(f"data.eval: format {eval_fmt} differs from data.train's {fmt}; use the same format")
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    model = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)
    check_max_length(model, recipe.data.max_length)
    # A template file named in the recipe replaces the model's own (adding the tokens it needs); else
    # the model keeps the template its tokenizer ships with, untouched.
    new_tokens = []
    if recipe.model.chat_template:
        new_tokens = attach_chat_template(model, tok, recipe.model.chat_template)
    elif tok.chat_template:
        use_own_template(model, tok)
    if fmt == "messages" and not tok.chat_template:
        raise UserError("model.chat_template: the model has no chat template; name one, e.g. data_templates/chatml.jinja")
    mode = default_loss(fmt) if recipe.sft.loss == "auto" else recipe.sft.loss
    check_loss_mode(fmt, mode, tok)
    max_length, overlong = recipe.data.max_length, recipe.sft.overlong
    train_ds, stats = encode(tok, train_rows, fmt, mode, max_length, overlong, "train")
    eval_ds, eval_stats = encode(tok, eval_rows, fmt, mode, max_length, overlong, "eval") if eval_rows else (None, {})

    run = Run(recipe).start(force)
    packing = recipe.train.packing and packing_is_exact(model)
    if recipe.train.packing and not packing:
        print("note: packing is off: this model mixes packed sequences (its attention ignores position ids)")
    use_cache = model.config.use_cache
    if packing:
        # transformers keeps packed sequences apart only when no KV cache is built (masking_utils
        # _preprocess_mask_arguments); most checkpoints ship use_cache: true, and training needs none
        model.config.use_cache = False
    peft_config = lora_config(recipe.model.lora, "CAUSAL_LM", new_tokens) if recipe.model.lora else None
    args = SFTConfig(**trainer_kwargs(recipe, run, max_length=max_length, packing=packing, packing_strategy="bfd",
                                      eval_packing=False, assistant_only_loss=False, completion_only_loss=False))
    trainer = build_trainer(CountingSFTTrainer, run, model=model, args=args, train_dataset=train_ds,
                            eval_dataset=eval_ds, processing_class=tok, peft_config=peft_config)
    if peft_config is not None:
        expose_head_bias(trainer.model)
    use_full_logits_on_cpu(trainer.model)
    if packing:  # TRL refuses a custom collator with packing at construction, so it is swapped in afterwards
        trainer.data_collator = PackedRows(pad_id(tok))
    train_metrics = fit(trainer, run)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ds is not None else None  # every process (it gathers)
    unshard(trainer, run)  # every process; under FSDP rank 0 gets the whole model as trainer.model
    if not run.is_main:
        return run.dir

    model = trainer.model
    trained = sum(sum(t != -100 for t in lab) for lab in train_ds["labels"])
    summary: dict = {
        **stats, **eval_stats,
        "loss_mode": mode, **({"assistant_mask": mask_source(tok)} if mode == "assistant_only" else {}),
        "packing": packing, "padding_fraction": trainer.padding_fraction,
        "trained_token_fraction": trained / sum(len(x) for x in train_ds["input_ids"]),
        "lora": recipe.model.lora is not None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_loss": train_metrics.get("train_loss"),
    }
    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    summary["final_loss"] = losses[-1] if losses else None
    if eval_ds is not None:
        summary["eval_loss"] = eval_loss
        run.log(trainer.state.global_step, {"eval_loss": summary["eval_loss"]})
    if recipe.eval.prompts:
        result = evaluate_prompts(model, tok, recipe.eval, run.dir)
        summary.update(result.metrics)
        if result.scores:
            summary.update(heldout_retention(recipe, result.rows, result.scores))

    model.config.use_cache = use_cache  # saved as the checkpoint had it

    def save(out: str) -> None:
        trainer.save_model(out)
        tok.save_pretrained(out)
        if recipe.model.lora and recipe.sft.merge:
            summary["merged_dir"] = str(merge_adapter(out, finished=False))

    kind = "LoRA adapter" if recipe.model.lora else "fully fine-tuned model"
    template = recipe.model.chat_template or "the model's own"
    notes = (f"A {kind} from `{recipe.model.path}`, supervised fine-tuned on `{recipe.data.train}` ({fmt}, "
             f"{mode} loss) with chat template `{template}`.")
    return run.finish(summary, title="SFT model", notes=notes, save=save,
                      curves=[Curve(["loss", "eval_loss"], "loss.png", "SFT loss", "cross-entropy")])
