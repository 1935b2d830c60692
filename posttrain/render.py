"""How one training example becomes token ids and a loss mask.

This is the single place that decides which tokens SFT trains on; `posttrain show-mask` prints
exactly what this returns, so what you see is what the trainer gets.

- messages, assistant-only loss: the assistant's content and its end-of-turn token, nothing of
  system or user turns. With {% generation %} markers in the template, the marked blocks; without
  them (nearly every stock template), the template itself says where each answer starts: the
  conversation up to that turn, rendered with a generation prompt, is a prefix of the whole
  conversation, and the answer runs from there to the template's end-of-turn token. Both give the
  same mask where markers exist (tested on the world's SFT set).
- prompt/completion, completion-only loss: the tokens after the prompt, plus the end token.
- text, or loss "all": every token.
"""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.templates import apply_template, end_of_turn, has_generation_markers, render_text

LOSS_MODES = ("assistant_only", "completion_only", "all")


def default_loss(fmt: str) -> str:
    return {"messages": "assistant_only", "prompt_completion": "completion_only"}.get(fmt, "all")


def check_loss_mode(fmt: str, mode: str, tokenizer) -> None:
    if mode == "assistant_only":
        if fmt != "messages":
            raise UserError(f"sft.loss: assistant_only needs chat data (messages), not {fmt}; use completion_only or all")
        if not tokenizer.chat_template:
            raise UserError("model.chat_template: assistant-only loss needs a chat template and the model has none; "
                            "name one, e.g. data_templates/chatml.jinja")
    if mode == "completion_only" and fmt != "prompt_completion":
        raise UserError(f"sft.loss: completion_only needs prompt/completion data, not {fmt}; use all")


def render(tokenizer, row: dict, fmt: str, mode: str) -> tuple[list[int], list[int]]:
    """(token ids, mask) for one example; mask[i] == 1 means token i is trained."""
    if fmt == "messages":
        if mode == "assistant_only":
            if has_generation_markers(tokenizer.chat_template):
                out = apply_template(tokenizer, row["messages"], tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
                return list(out["input_ids"]), list(out["assistant_masks"])
            return template_mask(tokenizer, row["messages"])
        ids = apply_template(tokenizer, row["messages"], tokenize=True, return_dict=False)
        return list(ids), [1] * len(ids)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational: the template closes the turn itself
            head = apply_template(tokenizer, prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = apply_template(tokenizer, prompt + completion, tokenize=True, return_dict=False)
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


def mask_source(tokenizer) -> str:
    """How assistant-only masks are made with this tokenizer's template (shown by show-mask, kept in
    the SFT summary)."""
    return "generation markers" if has_generation_markers(tokenizer.chat_template) else "derived from the template"


def template_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask) of a conversation from a template without markers: each assistant answer is the
    text between the rendering of the conversation before it (with a generation prompt) and the
    template's end-of-turn token, which is trained too. Tokens are marked by character offsets, as HF
    marks {% generation %} blocks, so a token that straddles the boundary is trained."""
    if not tokenizer.is_fast:
        raise UserError("model.path: deriving the assistant mask needs a fast tokenizer (tokenizer.json); "
                        "use one, or a template with {% generation %} markers")
    text = render_text(tokenizer, messages)
    eot = end_of_turn(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render_text(tokenizer, messages[:i], add_generation_prompt=True)
        if not text.startswith(head):
            raise UserError(f"model.chat_template: rendered up to assistant turn {len(spans) + 1} (message {i + 1}), the "
                            "template's text is not the start of the whole conversation's (it rewrites earlier "
                            "turns, e.g. drops reasoning or adds a date), so the answer cannot be located; use a "
                            "template with {% generation %} markers (data_templates/chatml.jinja) or sft.loss: all")
        start = len(head)
        end = text.find(eot, start) if eot else -1
        if end >= 0:
            end += len(eot)
        else:  # no end-of-turn token: the answer is what rendering this turn adds
            turn = render_text(tokenizer, messages[: i + 1])
            if not text.startswith(turn):
                raise UserError(f"model.chat_template: assistant turn {len(spans) + 1} (message {i + 1}) renders "
                                "differently inside the whole conversation and the template has no end-of-turn "
                                "token to find its end; use a template with {% generation %} markers")
            end = len(turn)
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


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
