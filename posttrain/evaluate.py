"""Generation and the measurements built on it: raw-text fact recall, and chat answers scored by
the world's gold verifier."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str  # the continuation up to (not including) the stop token
    stopped: bool  # the model produced a stop token by itself
    tokens: int  # generated tokens, stop token included


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    stop_ids: list[int],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[Generation]:
    """Continue each prompt (token ids). Greedy when temperature is 0. Batches are left-padded and
    sorted by length; every batch reseeds the sampler, so the same prompts and seed give the same
    samples whatever model is asked."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        torch.manual_seed(seed + b)
        sampled = temperature > 0
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sampled,
            temperature=temperature if sampled else None,
            top_p=top_p if sampled else None,
            top_k=0 if sampled else None,
            eos_token_id=stop_ids,
            pad_token_id=pad,
        )[:, width:].tolist()
        for row, i in enumerate(idx):
            seq = gen[row]
            stop_at = next((k for k, t in enumerate(seq) if t in stop_ids), None)
            body = seq if stop_at is None else seq[:stop_at]
            text = tokenizer.decode(body, skip_special_tokens=False)
            out[i] = Generation(text=text, stopped=stop_at is not None, tokens=len(body) + (stop_at is not None))
    model.train(was_training)
    return out  # type: ignore[return-value]


_WORD = re.compile(r"[A-Za-z]+")


def fact_recall(model, tokenizer, rows: list[dict], batch_size: int = 128) -> dict:
    """Raw-text recall: greedy-complete each probe ("Ada Lang lives in") and check the first word
    against the answer. Returns overall recall, recall by attribute and by group, and per-row hits."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = [bos + tokenizer.encode(r["prompt"], add_special_tokens=False) for r in rows]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [0]
    gens = generate(model, tokenizer, prompts, stop_ids=stop, max_new_tokens=4, batch_size=batch_size)
    hits = []
    for r, g in zip(rows, gens, strict=True):
        words = _WORD.findall(g.text)
        hits.append(bool(words) and words[0] == r["answer"])
    result = {"recall": sum(hits) / len(hits)}
    for key in ("attribute", "group"):
        groups = defaultdict(list)
        for r, h in zip(rows, hits, strict=True):
            if key in r:
                groups[r[key]].append(h)
        for name, hs in sorted(groups.items()):
            result[f"recall_{name}"] = sum(hs) / len(hs)
    result["hits"] = hits
    return result
