"""Seconds per rollout under FSDP2: the policy's weights gathered once per rollout
(posttrain.sharding.whole_weights, what PPO and GRPO do) against the weights all-gathered again for
every decoded token (a plain generate() on the sharded model, which then needs synced_gpus so that no
process stops its forwards while another still all-gathers; what TRL's GRPOTrainer does under FSDP2).

    OMP_NUM_THREADS=1 .venv/bin/accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \\
        scripts/bench_sharded_rollout.py --model runs/world/sft --out runs/bench/sharded_rollout.json
    ... scripts/bench_sharded_rollout.py --layers 12 --width 768 --out ...     # a GPT-2-small-shaped model from a config

Both generate the same number of tokens (min_new_tokens = max_new_tokens), from the same random
prompts, sampling with the same seed; each way is timed `--repeats` times after one warm-up, and the
median is reported. Rank 0 prints one JSON line and appends it to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model directory (default: a GPT-2 built from --layers/--width)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--batch", type=int, default=8, help="prompts per process")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()

    from posttrain import sharding

    sharding.fsdp_on_cpu()
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, GPT2Config

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    if a.model:
        model = AutoModelForCausalLM.from_pretrained(a.model)
        name = a.model
    else:
        config = GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=max(1, a.width // 64), n_positions=1024)
        model = AutoModelForCausalLM.from_config(config)
        name = f"GPT-2 config, {a.layers} layers x {a.width}"
    params = sum(t.numel() for t in model.parameters())
    model = accelerator.prepare(model.eval())
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (a.batch, a.prompt_length), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=prompts.to(accelerator.device), attention_mask=torch.ones_like(prompts).to(accelerator.device),
              max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=True, top_k=0,
              pad_token_id=0)

    def once(gathered: bool) -> float:
        torch.manual_seed(2)
        start = time.perf_counter()
        with torch.no_grad():
            if gathered:
                with sharding.whole_weights(model):
                    model.generate(**kw)
            else:
                model.generate(**kw, synced_gpus=True)
        accelerator.wait_for_everyone()
        return time.perf_counter() - start

    seconds = {}
    for way, gathered in (("gathered_once", True), ("per_token", False)):
        once(gathered)  # warm-up
        seconds[way] = statistics.median(once(gathered) for _ in range(a.repeats))
    if accelerator.is_main_process:
        row = {"model": name, "parameters": params, "processes": accelerator.num_processes,
               "tokens_per_process": a.batch * a.new_tokens, **{f"seconds_{k}": round(v, 4) for k, v in seconds.items()},
               "per_token_over_gathered": round(seconds["per_token"] / seconds["gathered_once"], 2)}
        print(json.dumps(row))
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with Path(a.out).open("a") as f:  # one line per model measured
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
