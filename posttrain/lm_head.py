"""Per-token log-probabilities from the full logits where that is faster than TRL's fused LM head.

TRL's SFT and DPO trainers patch the model (trl.trainer.utils.add_fused_lm_head) so that
`model(..., labels=..., fused_lm_head=True)` returns per-token log-probs, entropy and top-1 hits without
ever building the [batch, length, vocab] logits: tiles of the LM head are recomputed in a custom backward
(trl/kernels/chunked_logprob.py). On an accelerator that saves memory, with Triton kernels. On a CPU it
runs as Python-driven torch ops, and on the world's models it was the slowest part of a step: 36 of
146 ms in SFT, 58 of 263 ms in DPO (make bench). There, while the logits are small, the same outputs are
computed from the model's own logits; past `MAX_LOGITS` elements (e.g. GPT-2 at 8 x 1024 tokens) the
fused head still runs, so memory stays bounded.
"""

from __future__ import annotations

import functools

import torch
from trl.trainer.utils import FusedCausalLMOutput

MAX_LOGITS = 2**26  # logits elements (256 MB in fp32) above which the fused head's memory saving wins
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # beside log_probs, as the trainer asks


def _is_fused(module: torch.nn.Module) -> bool:
    func = getattr(module.forward, "__func__", None)  # TRL's patch is a bound method named like the original
    return getattr(getattr(func, "__code__", None), "co_name", "") == "_fused_forward"


def use_full_logits_on_cpu(*models) -> int:
    """Give every module of `models` that TRL patched a forward that answers `fused_lm_head=True` from
    the full logits, on a CPU and below MAX_LOGITS. Returns how many were changed (0 off a CPU)."""
    changed = 0
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if _is_fused(module) and next(module.parameters()).device.type == "cpu":
                module.forward = _full_logits_forward(module.forward)
                changed += 1
    return changed


def _requested(fused) -> tuple[str, ...]:
    """The fields the trainer asked TRL's head for (add_fused_lm_head's `outputs`, kept in the patched
    forward's closure); every field if that cannot be read. Each costs a pass over the logits."""
    func = fused.__func__
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or (), strict=True))
    cell = cells.get("outputs")
    return tuple(cell.cell_contents) if cell is not None else EXTRAS


def _full_logits_forward(fused):
    """Wrap TRL's patched forward `fused` (which runs the original forward when fused_lm_head is False)."""
    wanted = _requested(fused)

    # The original signature, as TRL keeps it: `generate` reads it to decide which inputs to make (without
    # position_ids there, a left-padded row would be generated at positions shifted by its padding).
    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        target = labels if shift_labels is None else shift_labels
        vocab = fused.__self__.get_output_embeddings().weight.shape[0]
        if (not fused_lm_head or target is None or target.numel() * vocab > MAX_LOGITS
                or kwargs.get("output_router_logits")):  # MoE: TRL's head adds the load-balancing loss
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        out = fused(*args, **kwargs)  # the model's own forward: logits with its softcapping and scaling
        logits = out.logits.float()
        if shift_labels is None:
            logits, target = logits[:, :-1], labels[:, 1:]
        mask = target != -100
        scored, picked = logits[mask], target[mask]  # only the positions with a label, as TRL's Triton path
        logp = scored.log_softmax(-1)
        log_probs = logp.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
        extra = {}
        if "entropy" in wanted:
            extra["entropy"] = -(logp.exp() * logp).sum(-1)  # differentiable, as TRL's
        with torch.no_grad():  # TRL's kernel marks the others non-differentiable
            if "log_sum_sq_probs" in wanted:
                extra["log_sum_sq_probs"] = torch.logsumexp(2 * logp, -1)
            if "mean_logits" in wanted:
                extra["mean_logits"] = scored.mean(-1)
            if "is_top1" in wanted:  # argmax's first maximum, as TRL's: a tie with an earlier token is no hit
                extra["is_top1"] = scored.argmax(-1) == picked

        def place(x: torch.Tensor) -> torch.Tensor:  # back to [batch, length], zero where there is no label
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=place(log_probs), label_mask=mask,
                                   **{k: place(v) for k, v in extra.items()})

    return forward
