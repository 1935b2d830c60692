"""Chat templates and the special tokens they imply, for any tokenizer: rendering a conversation,
finding the end-of-turn token, the ids that stop an answer or pad a batch, and the ids that ask a
model to answer a prompt. Nothing here touches a model (posttrain/models.py attaches templates).
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import TemplateError

from posttrain.errors import UserError

MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
COMMENT = re.compile(r"\{#.*?#\}", re.DOTALL)
SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")
STOP = re.compile(r"stop:\s*(\S+)")


def read_template(path: str) -> str:
    """A chat template file's text, checked: UTF-8, not empty, and valid Jinja (compiled as
    transformers compiles it, so a syntax error names its line here, not deep inside a training run)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model.chat_template: {path} not found; templates live in data_templates/ (e.g. data_templates/chatml.jinja)")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"model.chat_template: {path} is not UTF-8 text; save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"model.chat_template: {path} is empty; a template renders the conversation")
    check_template(text, str(path))
    body = COMMENT.sub("", text)
    if not re.search(r"\{[{%]", body) or not re.search(r"\bmessages\b", body):
        raise UserError(f"model.chat_template: {path} is not a chat template: it has no Jinja tag that reads "
                        "`messages`, the conversation a template renders; point it at a .jinja template "
                        "(e.g. data_templates/chatml.jinja)")
    return text


def check_template(text: str, where: str) -> None:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the template is checked when it first renders
        return
    try:
        _compile_jinja_template(text)
    except TemplateError as e:
        line = f":{e.lineno}" if getattr(e, "lineno", None) else ""
        raise UserError(f"model.chat_template: {where}{line}: not a valid Jinja template ({e.message or e}); "
                        "fix the template") from None


def apply_template(tokenizer, messages: list[dict], **kw):
    """tokenizer.apply_chat_template(messages, **kw), where a template that fails on a conversation (its own
    raise_exception, a sandbox violation, an undefined name) is a one-line error, not a traceback."""
    try:
        return tokenizer.apply_chat_template(messages, **kw)
    except TemplateError as e:
        raise UserError(f"model.chat_template: the chat template fails on this conversation ({e}); fix the template "
                        "or the data") from None


def has_generation_markers(template: str) -> bool:
    return bool(MARKER.search(COMMENT.sub("", template)))


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`."""
    return apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_EOT_CACHE: dict[tuple[str, frozenset], str | None] = {}
_PROBE = "Zq7 probe answer"


def end_of_turn(tokenizer) -> str | None:
    """The special token that closes an assistant turn in the tokenizer's chat template (<|im_end|>,
    <|eot_id|>, <end_of_turn>, </s> ...), read off the template itself: a probe answer is rendered and
    the first special token after it is the one. None without a template or without such a token."""
    template = tokenizer.chat_template
    if not template:
        return None
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(tokenizer.all_special_tokens)
    key = (template, frozenset(specials))
    if key not in _EOT_CACHE:
        text = render_text(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
        after = text[text.rfind(_PROBE) + len(_PROBE):] if _PROBE in text else ""
        found = [(after.find(t), t) for t in specials if t and t in after]
        _EOT_CACHE[key] = min(found)[1] if found else None
    return _EOT_CACHE[key]


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: the EOS, the template's end-of-turn token where it differs (a stock
    template that ends turns with <|im_end|> while the EOS is <|endoftext|>), and the end-of-text
    token."""
    ids = [tokenizer.eos_token_id]
    for token in (end_of_turn(tokenizer), "<|endoftext|>"):
        if token is not None and token in tokenizer.get_vocab():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid not in ids:
                ids.append(tid)
    return [i for i in ids if i is not None]


def answer_end(tokenizer) -> int:
    """The one token that ends an answer in this tokenizer's format: the template's end-of-turn token
    when it has one, else the EOS. It is what a model is scored on after an answer that stopped when
    the token that answer actually stopped on is not in its vocabulary."""
    token = end_of_turn(tokenizer)
    if token is not None and token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    """The id to pad with: the pad token, else the EOS. Which one never matters for what is computed:
    every length comes from attention masks or labels, never from finding pad ids."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids that ask the model to answer `prompt`: the chat template with a generation prompt
    when the tokenizer has one, else the plain text after a BOS."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return list(apply_template(tokenizer, messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(text, add_special_tokens=False)
