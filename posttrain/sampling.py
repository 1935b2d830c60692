"""Sampling where every answer has a random stream of its own.

`generate(do_sample=True)` draws every row of a batch from one random stream, so which answer a
prompt gets depends on the batch it happens to be in: on how many processes share the work, and on
where a resumed run picks up. Here each row samples from its own generator, seeded by (run seed,
step, the answer's place in the global batch), so one process and N processes draw the same answers
for the same step, and a resumed run draws what the uninterrupted one did. The sampled token is
forced through a logits processor and generate() runs greedily, so the KV cache, stopping and
padding stay transformers' own.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as HF `generate` computes them. A forward pass over left-padded
    sampled answers must use these: with the default 0..T-1, an absolute-position model (GPT-2) scores
    each answer at positions shifted by its padding, i.e. not the distribution it was sampled from."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_seed(seed: int, step: int, index: int) -> int:
    """A seed for answer `index` of the batch generated at optimizer step `step` of a run seeded `seed`."""
    return (((seed * 1_000_003) ^ (step * 7_919)) * 1_000_033 + index) % (2**63 - 1)


class SeededSampler(LogitsProcessor):
    """Samples row i with generator i (temperature, then top-k and top-p), then leaves only that token possible."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_k and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(-1).cpu()
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(-1, picks.to(scores.device), 0.0)


@torch.no_grad()
def sample(model, prompts: list[list[int]], seeds: list[int], *, stop_ids: list[int], pad_id: int,
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           batch_size: int = 64) -> list[list[int]]:
    """One sampled answer per prompt (token ids), up to and including its first stop token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for b in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[b : b + batch_size], seeds[b : b + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                  pad_token_id=pad_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             logits_processor=LogitsProcessorList([SeededSampler(chunk_seeds, temperature, top_p, top_k)]),
                             synced_gpus=False)  # sharded weights are gathered first (sharding.whole_weights)
        for seq in gen[:, width:].tolist():
            stop = next((k for k, t in enumerate(seq) if t in stop_ids), None)
            out.append(seq if stop is None else seq[: stop + 1])
    model.train(was_training)
    return out
