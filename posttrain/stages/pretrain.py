"""Pretrain a small GPT-2 from scratch: the embedded "pretrained checkpoint" when no real one is at hand.

Reads:  data.train (text rows), data.max_length (block size), model.config (architecture) or
        model.path (continue a checkpoint), pretrain.tokenizer (train a byte-level BPE, or load one),
        pretrain.probe (raw-text fact probes), train.*
Writes: a standard Hugging Face directory (safetensors + config + tokenizer) that
        `AutoModelForCausalLM.from_pretrained` loads, plus the usual run files.
Reports: final loss, fact recall on the probes (overall, by attribute, seen vs held-out people).

Each pass over the corpus shuffles the documents and cuts the stream into blocks anew, so blocks
straddle different document boundaries every time, as in GPT-2 pretraining.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from rich.console import Console
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from posttrain import data as datalib
from posttrain.errors import UserError
from posttrain.evaluate import fact_recall
from posttrain.recipe import PretrainRecipe
from posttrain.runs import Curve, Run
from posttrain.sharding import unshard
from posttrain.training import build_trainer, fit, trainer_kwargs

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def build_tokenizer(recipe: PretrainRecipe, texts: list[str]):
    """Load the recipe's tokenizer (a Hugging Face dir, BPE files such as OpenAI's encoder.json + vocab.bpe,
    or "gpt2": GPT-2's, offline), or train a byte-level BPE on the corpus (GPT-2's scheme)."""
    cfg = recipe.pretrain.tokenizer
    if cfg.path:
        from posttrain.gpt2_tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.path)
    elif recipe.model.path:  # a model directory, or a nanoGPT .pt checkpoint (posttrain.models reads both)
        from posttrain.models import load_tokenizer

        tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    else:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                special_tokens=SPECIALS, show_progress=False)
        with tempfile.TemporaryDirectory() as d:
            bpe.save_model(d)
            tok = GPT2Tokenizer.from_pretrained(d, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                                                unk_token=SPECIALS[0], pad_token=SPECIALS[1])
    if tok.eos_token_id is None:
        raise UserError("pretrain.tokenizer: the tokenizer has no end-of-text token; add one (e.g. <|endoftext|>)")
    if tok.pad_token_id is None:
        tok.add_special_tokens({"pad_token": SPECIALS[1]})
    tok.model_max_length = recipe.data.max_length
    return tok


def documents(tok, texts: list[str]) -> list[list[int]]:
    """Each text's ids, closed by the EOS and, for a tokenizer whose BOS is its own token (Gemma, Llama),
    opened by the BOS, as those families are pretrained: their chat templates and posttrain's fact probes
    start with <bos>, which a model pretrained without it has never seen (a Gemma 3 base pretrained on
    the world without it recalled 72% of facts from a <bos>-led probe)."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else []
    return [bos + ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def blocks(doc_ids: list[list[int]], block: int, passes: int, seed: int) -> np.ndarray:
    """`passes` reshuffled passes over the documents, each cut into fixed-length blocks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(passes):
        stream = np.concatenate([doc_ids[i] for i in rng.permutation(len(doc_ids))])
        n = len(stream) // block
        out.append(stream[: n * block].reshape(n, block))
    return np.concatenate(out)


def main(recipe: PretrainRecipe, force: bool = False) -> Path:
    table = datalib.load(recipe.data.train, recipe.data.columns, recipe.data.limit)
    datalib.validate(table, "text")
    texts = [r["text"] for r in table]
    run = Run(recipe).start(force)
    console = Console()

    tok = build_tokenizer(recipe, texts)
    doc_ids = documents(tok, texts)
    n_tokens = sum(len(d) for d in doc_ids)
    block = recipe.data.max_length
    per_pass = n_tokens // block
    if per_pass == 0:
        raise UserError(f"data.train: the corpus has {n_tokens} tokens, fewer than one block (data.max_length={block})")
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    needed = (t.max_steps or 0) * t.batch_size * t.grad_accum * world
    passes = max(math.ceil(t.epochs), math.ceil(needed / per_pass))
    train_blocks = blocks(doc_ids, block, passes, recipe.seed)
    train_ds = Dataset.from_dict({"input_ids": train_blocks, "labels": train_blocks})
    eval_ds = None
    if recipe.data.eval:
        ev = datalib.load(recipe.data.eval)
        datalib.validate(ev, "text")
        ev_ids = documents(tok, [r["text"] for r in ev])
        eb = blocks(ev_ids, block, 1, recipe.seed)
        eval_ds = Dataset.from_dict({"input_ids": eb, "labels": eb})

    torch.manual_seed(recipe.seed)
    if recipe.model.path:
        from posttrain.models import load_start_model

        # no tokenizer check: pretraining grows the embeddings to the tokenizer (a pad token it adds) below
        model = load_start_model(recipe.model.path, getattr(recipe.model, "dtype", "auto"), recipe.model.trust_remote_code)
        model.resize_token_embeddings(len(tok))
    else:
        c = recipe.model.config
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_positions=block, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            n_inner=c.n_inner, activation_function=c.activation,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
    n_params = sum(p.numel() for p in model.parameters())
    if run.is_main:
        console.print(f"[bold]pretrain[/]: {len(texts)} documents, {n_tokens:,} tokens, vocab {len(tok)}, "
                      f"{n_params / 1e6:.2f}M parameters, {len(train_blocks):,} blocks of {block} ({passes} passes)")

    args = TrainingArguments(**trainer_kwargs(recipe, run, num_train_epochs=1, per_device_eval_batch_size=64))
    trainer = build_trainer(Trainer, run, model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=default_data_collator)
    train_metrics = fit(trainer, run)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ds is not None else None  # every process (it gathers)
    unshard(trainer, run)  # every process; under FSDP rank 0 gets the whole model as trainer.model
    if not run.is_main:
        return run.dir

    summary: dict = {"params": n_params, "vocab_size": len(tok), "corpus_tokens": n_tokens,
                     "tokens_seen": trainer.state.global_step * t.batch_size * t.grad_accum * world * block}
    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    summary["final_loss"] = losses[-1] if losses else float("nan")
    summary["train_loss"] = train_metrics.get("train_loss")
    summary["train_seconds"] = train_metrics.get("train_runtime")
    if eval_ds is not None:
        summary["eval_loss"] = eval_loss
    if recipe.pretrain.probe:
        probes = datalib.load(recipe.pretrain.probe)
        datalib.validate(probes, "prompt_completion", {"completion": "answer"})
        rec = fact_recall(model, tok, probes.rows)
        hits = rec.pop("hits")
        summary.update({f"fact_{k}": v for k, v in rec.items()})
        (run.dir / "probe_results.jsonl").write_text(
            "".join(json.dumps({**r, "hit": h}) + "\n" for r, h in zip(probes.rows, hits, strict=True)))
        run.log(trainer.state.global_step, {f"fact_{k}": v for k, v in rec.items()})

    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    notes = (f"A GPT-2 ({n_params / 1e6:.2f}M parameters) pretrained from scratch on `{recipe.data.train}` "
             f"with posttrain. Load it with `AutoModelForCausalLM.from_pretrained('{run.dir}')`.")
    return run.finish(summary, title="Pretrained base model", notes=notes, save=trainer.save_model, tokenizer=tok,
                      curves=[Curve(["loss", "eval_loss"], "loss.png", "pretraining loss", "cross-entropy")])
