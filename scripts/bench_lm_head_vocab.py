"""TRL's fused LM head against posttrain's full-logits path (posttrain/lm_head.py) at a large vocabulary:
seconds per forward + backward and peak memory of one process, for one labelled batch.

    .venv/bin/python scripts/bench_lm_head_vocab.py                      # vocabulary 262,144 (Gemma 3), width 640
    .venv/bin/python scripts/bench_lm_head_vocab.py --vocab 50257 --width 768

Each (path, tokens) runs in a fresh process, so that its peak resident memory is its own. The model is
a one-block GPT-2 of the given width, so the LM head dominates, as it does in small models with big
vocabularies (Gemma 3 270M: 170M of its 270M parameters are the embedding).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(path: str, tokens: int, vocab: int, width: int, repeats: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl.trainer.utils import add_fused_lm_head

    from posttrain import lm_head

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab,
                                       n_positions=max(1024, tokens)))
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    if path == "full":
        lm_head.MAX_LOGITS = 2**62  # the full logits whatever their size
        lm_head.use_full_logits_on_cpu(model)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        out.loss.backward()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "tokens": tokens, "seconds": round(sorted(seconds[1:])[len(seconds[1:]) // 2], 4),
            "peak_mb_over_model": round((peak - base) / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--tokens", default="128,512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.vocab, a.width, a.repeats)))
        return
    for tokens in (int(t) for t in a.tokens.split(",")):
        for path in ("fused", "full"):
            out = subprocess.run([sys.executable, __file__, "--vocab", str(a.vocab), "--width", str(a.width),
                                  "--repeats", str(a.repeats), "--one", path, str(tokens)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
