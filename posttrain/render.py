"""How one training example becomes token ids and a loss mask.

This is the single place that decides which tokens SFT trains on; `posttrain show-mask` prints
exactly what this returns, so what you see is what the trainer gets.

- messages, assistant-only loss: the chat template's {% generation %} blocks (the assistant's
  content and its end-of-turn token), nothing of system or user turns.
- prompt/completion, completion-only loss: the tokens after the prompt, plus the end token.
- text, or loss "all": every token.
"""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.models import has_generation_markers

LOSS_MODES = ("assistant_only", "completion_only", "all")


def default_loss(fmt: str) -> str:
    return {"messages": "assistant_only", "prompt_completion": "completion_only"}.get(fmt, "all")


def check_loss_mode(fmt: str, mode: str, tokenizer) -> None:
    if mode == "assistant_only":
        if fmt != "messages":
            raise UserError(f"sft.loss: assistant_only needs chat data (messages), not {fmt}; use completion_only or all")
        if not tokenizer.chat_template or not has_generation_markers(tokenizer.chat_template):
            raise UserError(
                "model.chat_template: assistant-only loss needs a template with {% generation %} markers around the "
                "assistant's turn (see data_templates/chatml.jinja), or set sft.loss: all"
            )
    if mode == "completion_only" and fmt != "prompt_completion":
        raise UserError(f"sft.loss: completion_only needs prompt/completion data, not {fmt}; use all")


def render(tokenizer, row: dict, fmt: str, mode: str) -> tuple[list[int], list[int]]:
    """(token ids, mask) for one example; mask[i] == 1 means token i is trained."""
    if fmt == "messages":
        if mode == "assistant_only":
            out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            return list(out["input_ids"]), list(out["assistant_masks"])
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        return list(ids), [1] * len(ids)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational: the template closes the turn itself
            head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
        else:
            head = tokenizer.encode(prompt, add_special_tokens=False)
            ids = tokenizer.encode(prompt + completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        # Where the prompt's tokens stop being a prefix is where the completion starts (a merge can
        # straddle the boundary).
        start = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), min(len(head), len(ids)))
        mask = [0] * start + [1] * (len(ids) - start) if mode == "completion_only" else [1] * len(ids)
        return list(ids), mask
    ids = tokenizer.encode(row["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def show(tokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    """The example as text with trained tokens highlighted: green on a terminal, [[...]] otherwise."""
    parts, run, trained = [], [], None
    for tid, m in zip(ids, mask, strict=True):
        if trained is not None and bool(m) != trained:
            parts.append(_span(tokenizer.decode(run), trained, color))
            run = []
        run.append(tid)
        trained = bool(m)
    if run:
        parts.append(_span(tokenizer.decode(run), bool(trained), color))
    return "".join(parts)


def _span(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return f"\x1b[2m{text}\x1b[0m" if color else text
    return f"\x1b[42;30m{text}\x1b[0m" if color else f"[[{text}]]"
