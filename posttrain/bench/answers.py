"""The evaluation path (compare, the stages' evals) against a bare batched generate."""

from __future__ import annotations

import time

from posttrain.bench.common import ROOT, World


def _eval_rows(w: World, n: int):
    from posttrain import data as datalib
    from posttrain.compare import load_suite
    from posttrain.models import load_causal_lm, load_tokenizer

    suite = load_suite(ROOT / "eval" / "world.yaml")
    rows = datalib.load(f"{w.data}/eval_prompts.jsonl", limit=n).rows
    tok = load_tokenizer(w.sft)
    return rows, suite, tok, load_causal_lm(w.sft, "float32", tokenizer=tok)


def answer_ours(w: World, n: int) -> dict:
    from posttrain.evaluate import answer

    rows, suite, tok, model = _eval_rows(w, n)
    answer(model, tok, rows[:suite.batch_size], max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size)  # warm-up
    start = time.perf_counter()
    answer(model, tok, rows, max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size)
    seconds = time.perf_counter() - start
    return {"answers": len(rows), "seconds": seconds, "answers_per_s": len(rows) / seconds}


def answer_bare(w: World, n: int) -> dict:
    """Greedy answers with plain model.generate in file order, left-padded batches of the suite's size."""
    import torch

    from posttrain.ppo import left_pad
    from posttrain.templates import pad_id, prompt_ids, stop_ids

    rows, suite, tok, model = _eval_rows(w, n)
    model.eval()
    ids = [prompt_ids(tok, r["prompt"]) for r in rows]

    def run(chunk):
        prompts, mask = left_pad(chunk, pad_id(tok))
        with torch.no_grad():
            model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=suite.max_new_tokens, do_sample=False,
                           eos_token_id=stop_ids(tok), pad_token_id=pad_id(tok))

    run(ids[:suite.batch_size])  # warm-up
    start = time.perf_counter()
    for b in range(0, len(ids), suite.batch_size):
        run(ids[b:b + suite.batch_size])
    seconds = time.perf_counter() - start
    return {"answers": len(rows), "seconds": seconds, "answers_per_s": len(rows) / seconds}


