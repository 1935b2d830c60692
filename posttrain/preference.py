"""Preference pairs (prompt, chosen, rejected): loading, checks, tokenization, and reward scoring.

Rows may be conversational (message lists) or plain strings, or Alpaca-style records with
`instruction` (+ `input`), `chosen`, `rejected`. Pairs whose two answers are identical teach nothing
and are counted and skipped. A pair is rendered the way the chat model sees it at inference: the
prompt through the chat template with a generation prompt, the answer after it.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from posttrain import data as datalib
from posttrain.errors import UserError
from posttrain.templates import apply_template


def load_pairs(path: str, columns: list[str] | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """Normalised pairs {prompt, chosen, rejected} and counts {pairs, degenerate_skipped}."""
    return pairs_from_table(datalib.load(path, columns, limit))


def load_train_eval(data, eval_split: float | None, seed: int,
                    key: str = "eval_split") -> tuple[tuple[list[dict], dict], tuple[list[dict], dict]]:
    """The (pairs, counts) of data.train and of the eval set: data.eval, or with `eval_split` a seeded
    random fraction of data.train's records, held out before data.limit applies. The split is on
    records, so the same file, fraction and seed hold out the same records in every stage."""
    if not eval_split:
        train = load_pairs(data.train, data.columns, data.limit)
        return train, (load_pairs(data.eval, data.columns) if data.eval else ([], {}))
    table = datalib.load(data.train, data.columns)
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    n = round(len(order) * eval_split)
    if not 0 < n < len(order):
        raise UserError(f"{key}: {eval_split} of {len(order)} records in {data.train} leaves no "
                        f"{'eval' if n == 0 else 'training'} record; change the fraction")
    n_eval = datalib.heldout_size(n, data.limit, eval_split, 1 - eval_split)
    held, kept = table.select(sorted(order[:n_eval])), table.select(sorted(order[n:]))
    used = f", {n_eval} of them" if n_eval < n else ""
    print(f"note: held out {n} of {len(order)} records of {data.train}{used} as eval pairs (seed {seed})")
    return pairs_from_table(kept.head(data.limit)), pairs_from_table(held)


def pairs_from_table(table: datalib.Table) -> tuple[list[dict], dict]:
    path = table.source
    first = table.rows[0]
    if "instruction" in first and "prompt" not in first:
        rows = [_from_alpaca(r, table.where(i)) for i, r in enumerate(table)]
        table = datalib.Table(table.source, rows, table.lines)
    datalib.validate(table, "preference")
    pairs, degenerate = [], 0
    for i, row in enumerate(table):
        _check_forms(row, table.where(i))
        if _text(row["chosen"]) == _text(row["rejected"]):
            degenerate += 1
            continue
        pair = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        if isinstance(row.get("flaw"), str):  # what is wrong with `rejected` (world pairs): per-flaw metrics
            pair["flaw"] = row["flaw"]
        pairs.append(pair)
    if degenerate:
        print(f"note: {degenerate} of {len(table)} pairs in {path} have chosen == rejected: skipped")
    if not pairs:
        raise UserError(f"{path}: every pair has chosen == rejected; there is nothing to learn from")
    return pairs, {"pairs": len(pairs), "degenerate_skipped": degenerate}


def _from_alpaca(row: dict, where: str) -> dict:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise UserError(f"{where}: row is missing {key!r} (an Alpaca preference record needs instruction, chosen, rejected)")
    user = datalib.alpaca_to_messages({**row, "output": ""})[0]
    return {"prompt": [user], "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def _check_forms(row: dict, where: str) -> None:
    kinds = {k: isinstance(row[k], list) for k in ("prompt", "chosen", "rejected")}
    if len(set(kinds.values())) > 1:
        raise UserError(f"{where}: prompt, chosen and rejected mix strings and message lists; use one form for all three")
    if kinds["prompt"]:
        for key in ("chosen", "rejected"):
            if any(m["role"] != "assistant" for m in row[key]):
                raise UserError(f"{where}: {key} repeats non-assistant turns although `prompt` is given, so the prompt "
                                "would appear twice; keep only the assistant's answer in chosen/rejected")


def _text(value) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def encode(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) as the model sees them."""
    if isinstance(pair["prompt"], list):
        if not tok.chat_template:
            raise UserError("model.path: conversational pairs need a chat model (one with a chat template); run SFT first "
                            "or set model.chat_template")
        head = list(apply_template(tok, pair["prompt"], add_generation_prompt=True, return_dict=False))
        full = {k: list(apply_template(tok, pair["prompt"] + pair[k], return_dict=False)) for k in ("chosen", "rejected")}
    else:
        head = tok.encode(pair["prompt"], add_special_tokens=False)
        full = {k: tok.encode(pair["prompt"] + pair[k], add_special_tokens=False) + [tok.eos_token_id]
                for k in ("chosen", "rejected")}
    start = min(_common_prefix(head, full["chosen"]), _common_prefix(head, full["rejected"]))
    return full["chosen"][:start], full["chosen"][start:], full["rejected"][start:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fit_length(tok, pairs: list[dict], max_length: int, overlong: str, name: str) -> tuple[list[tuple], dict]:
    """Encode every pair and drop or truncate (keeping the prompt's start) those longer than
    max_length. Truncating still drops a pair whose prompt alone fills max_length, and one whose
    answers become identical once cut (a tie teaches nothing and scores as wrong). Every case is
    counted and printed; an error if none is left. Returns ([(prompt ids, chosen ids, rejected ids,
    index of the pair)], counts)."""
    kept, n_cut, n_dropped, n_tied = [], 0, 0, 0
    for i, pair in enumerate(pairs):
        p, c, r = encode(tok, pair)
        if len(p) + max(len(c), len(r)) > max_length:
            if overlong == "drop" or len(p) >= max_length:
                n_dropped += 1
                continue
            c, r = c[: max_length - len(p)], r[: max_length - len(p)]
            if c == r:
                n_tied += 1
                continue
            n_cut += 1
        kept.append((p, c, r, i))
    of = f"of {len(pairs)} {name} pairs"
    if n_cut:
        print(f"note: {n_cut} {of} are longer than data.max_length={max_length}: answers truncated")
    if n_dropped:
        why = "longer than" if overlong == "drop" else "have a prompt that alone fills"
        print(f"note: {n_dropped} {of} {why} data.max_length={max_length}: dropped")
    if n_tied:
        print(f"note: {n_tied} {of} have identical answers once cut to data.max_length={max_length}: dropped")
    if not kept:
        raise UserError(f"data.{name}: no pair left: all {len(pairs)} are longer than data.max_length={max_length}; raise it")
    counts = {f"{name}_pairs": len(kept), f"{name}_dropped_overlong": n_dropped}
    if overlong != "drop":
        counts |= {f"{name}_truncated_overlong": n_cut, f"{name}_tied_after_truncation": n_tied}
    return kept, counts


# --- scoring with a reward model ---------------------------------------------------------------------


class RewardScorer:
    """A trained reward model that scores (prompt, answer) text. It re-tokenises the text with its own
    tokenizer, so it can score answers from any policy, whatever that policy's tokenizer."""

    def __init__(self, model, tok, batch_size: int = 64):
        if model.config.num_labels != 1:
            raise UserError(f"not a reward model: it has {model.config.num_labels} labels, a reward model has 1")
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size
        from posttrain.templates import pad_id

        self.pad_id = pad_id(tok)  # the score is read at the last real token, by the attention mask

    @classmethod
    def load(cls, path: str | Path, device: torch.device | None = None) -> RewardScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.models import torch_dtype
        from posttrain.runs import require_done

        require_done(path, "reward model")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype("auto"))
        return cls(model.to(device) if device is not None else model, AutoTokenizer.from_pretrained(path))

    def ids(self, prompt, answer: str) -> list[int]:
        if isinstance(prompt, str) and self.tok.chat_template:
            prompt = [{"role": "user", "content": prompt}]
        answer_part = [{"role": "assistant", "content": answer}] if isinstance(prompt, list) else answer
        head, body, _ = encode(self.tok, {"prompt": prompt, "chosen": answer_part, "rejected": answer_part})
        return head + body

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        """Scores of token sequences, right-padded, each read at its last real token."""
        from posttrain.models import last_token_logits, right_padded_batches

        out = [0.0] * len(seqs)
        device = next(self.model.parameters()).device
        for idx, ids, mask in right_padded_batches(seqs, self.batch_size, self.pad_id):
            scores = last_token_logits(self.model, ids.to(device), mask.to(device))[:, 0].float().tolist()
            for i, s in zip(idx, scores, strict=True):
                out[i] = s
        return out

    def score(self, prompts: list, answers: list[str]) -> list[float]:
        return self.score_ids([self.ids(p, a) for p, a in zip(prompts, answers, strict=True)])
