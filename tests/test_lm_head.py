"""posttrain/lm_head.py: on a CPU, TRL's fused-LM-head outputs computed from the full logits must be
TRL's own: the same loss, per-token fields and gradients, for plain and PEFT models, packed rows and
pre-shifted labels; and past MAX_LOGITS the fused head still runs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from trl.trainer.utils import add_fused_lm_head

from posttrain import lm_head
from posttrain.lm_head import use_full_logits_on_cpu

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def _pair(lora: bool):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=1,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    fused, full = copy.deepcopy(model), copy.deepcopy(model)
    add_fused_lm_head(fused, outputs=outputs)
    add_fused_lm_head(full, outputs=outputs)
    if lora:
        cfg = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
        fused, full = get_peft_model(fused, cfg), get_peft_model(full, copy.deepcopy(cfg))
        full.load_state_dict(fused.state_dict())
    assert use_full_logits_on_cpu(full) == 1
    return fused, full


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[2, 15:] = -100  # a shorter answer
    return ids, labels


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_full_logits_match_trls_fused_head(lora, packed):
    fused, full = _pair(lora)
    ids, labels = _batch()
    kw = {"position_ids": torch.cat([torch.arange(12), torch.arange(8)]).repeat(3, 1)} if packed else {}
    outs = []
    for model in (fused, full):
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(31), **kw)
        (out.loss + 0.1 * out.entropy.sum()).backward()  # entropy is differentiable in both
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = outs
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    for name in FIELDS:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5, msg=name)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-5, rtol=1e-4, msg=n)


def test_pre_shifted_labels_and_plain_forward_pass_through():
    fused, full = _pair(lora=False)
    ids, labels = _batch()
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    a = fused(input_ids=ids, shift_labels=shifted, fused_lm_head=True)
    b = full(input_ids=ids, shift_labels=shifted, fused_lm_head=True)
    torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full(input_ids=ids).logits, fused(input_ids=ids).logits)  # generation's forward


def test_generation_of_left_padded_rows_is_unchanged():
    """`generate` makes position ids only for a forward whose signature has them; the wrapper keeps the
    model's signature, so a left-padded row generates as it does alone."""
    import inspect

    fused, full = _pair(lora=False)
    assert "position_ids" in inspect.signature(full.forward).parameters
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 1, 1, 5, 6, 7]])  # row 2: three pad tokens on the left
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    out = full.generate(ids, **kw)
    torch.testing.assert_close(out, fused.generate(ids, **kw))
    alone = full.generate(ids[1:, 3:], max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    assert out[1, 6:].tolist() == alone[0, 3:].tolist()


def _count_fused_calls(monkeypatch) -> list:
    import trl.trainer.utils as trl_utils

    calls, real = [], trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return real.apply(*args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    return calls


def test_small_logits_skip_the_fused_head_and_large_ones_keep_it(monkeypatch):
    fused, full = _pair(lora=False)
    ids, labels = _batch()
    calls = _count_fused_calls(monkeypatch)
    full(input_ids=ids, labels=labels, fused_lm_head=True)
    assert calls == []
    monkeypatch.setattr(lm_head, "MAX_LOGITS", ids.numel() * 97 - 1)
    out = full(input_ids=ids, labels=labels, fused_lm_head=True)
    assert calls == [1]
    torch.testing.assert_close(out.log_probs, fused(input_ids=ids, labels=labels, fused_lm_head=True).log_probs)
