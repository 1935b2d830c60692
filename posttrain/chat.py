"""`posttrain chat RUN_DIR`: talk to any model in the terminal.

Each turn the whole conversation goes through the model's chat template (the oldest exchanges are
dropped once it no longer fits the context) and the answer ends at the model's stop tokens
(templates.stop_ids) or after max_new_tokens. A model without a chat template (a base model) has no
notion of turns: each line you type is continued as plain text, with no history.

Commands: /reset (forget the history), /temp T (temperature; 0 = greedy), /max N (max new tokens),
/help, /quit. With piped input (stdin not a terminal) every line is a turn or a command and only the
answers are printed, one per line (line breaks inside an answer become spaces); notes go to stderr.
Sampling is seeded per turn, so the same input and --seed give the same answers.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import yaml

from posttrain.errors import UserError

HELP = "commands: /reset (clear history), /temp T (0 = greedy), /max N (max new tokens), /help, /quit"


class Chat:
    """A conversation with one model: the history, the sampling settings, and one reply per turn."""

    def __init__(self, model, tokenizer, *, temperature: float = 0.7, max_new_tokens: int = 64, seed: int = 0):
        from posttrain.models import context_length
        from posttrain.templates import stop_ids

        self.model, self.tok = model, tokenizer
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.context = context_length(model)
        self.stop = stop_ids(tokenizer)
        self.chat = bool(tokenizer.chat_template)
        self.history: list[dict] = []
        self.turn = 0  # seeds each turn differently, yet reproducibly
        self.dropped = 0  # exchanges forgotten because the context was full

    def reply(self, text: str):
        """The model's answer to `text` (an evaluate.Generation), added to the history."""
        from posttrain.evaluate import generate
        from posttrain.templates import prompt_ids

        self.history.append({"role": "user", "content": text})
        ids = prompt_ids(self.tok, self.history if self.chat else text)
        room = None if self.context is None else self.context - self.max_new_tokens
        while room is not None and len(ids) > room and len(self.history) > 2:
            self.history = self.history[2:]  # forget the oldest exchange (a user turn and its answer)
            self.dropped += 1
            ids = prompt_ids(self.tok, self.history)
        if room is not None and len(ids) > room:
            ids = ids[-room:]  # one message alone is too long: keep its end, nearest the answer
        gen = generate(self.model, self.tok, [ids], stop_ids=self.stop, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, seed=self.seed + self.turn, batch_size=1)[0]
        self.turn += 1
        if self.chat:
            self.history.append({"role": "assistant", "content": gen.text})
        else:
            self.history.clear()  # plain-text continuation keeps no history
        return gen

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to tell the user, or None for /quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return None
        if name == "/reset":
            self.history.clear()
            return "history cleared"
        if name == "/help":
            return HELP
        if name == "/temp":
            try:
                value = float(arg)
            except ValueError:
                value = -1.0
            if not math.isfinite(value) or value < 0:  # /temp nan would sample garbage
                return "usage: /temp 0.7 (a temperature >= 0; 0 = greedy)"
            self.temperature = value
            return f"temperature {value:g}" + (" (greedy)" if value == 0 else "")
        if name == "/max":
            limit = self.context - 1 if self.context else None
            if not arg.isdigit() or int(arg) < 1 or (limit is not None and int(arg) > limit):
                return f"usage: /max 64 (new tokens, 1..{limit or 'any'})"
            self.max_new_tokens = int(arg)
            return f"max new tokens {self.max_new_tokens}"
        return f"unknown command {name}; {HELP}"


DEFAULT_MAX_NEW_TOKENS = 64


def run_chat(run_dir: str, *, temperature: float = 0.7, max_new_tokens: int | None = None, seed: int = 0) -> int:
    """The `posttrain chat` command: an interactive session, or one answer per line of piped input."""
    from posttrain.models import context_length, device, load_causal_lm, load_tokenizer

    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{run_dir}: no such run directory")
    if not path.is_dir() and path.suffix != ".pt":
        raise UserError(f"{run_dir}: a file, not a model directory; give the run directory")
    recipe = path / "recipe.yaml"
    if recipe.is_file() and (yaml.safe_load(recipe.read_text()) or {}).get("stage") == "reward":
        raise UserError(f"{run_dir} is a reward model run, which scores answers but does not write them; chat with a policy")
    if path.is_dir() and not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        raise UserError(f"{run_dir}: not a model directory (no config.json or adapter_config.json)")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature {temperature}: must be a number >= 0 (0 = greedy)")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    tok = load_tokenizer(run_dir)
    model = load_causal_lm(run_dir, tokenizer=tok).to(device())
    context = context_length(model)
    fitted = None
    if max_new_tokens is None:  # the default fits any model: at most half its context, leaving room for the prompt
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if context is not None and max_new_tokens > context // 2:
            max_new_tokens = fitted = max(1, context // 2)
    chat = Chat(model, tok, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    if fitted is not None:
        print(f"note: answers of at most {fitted} tokens (half of the model's {context}-token context; "
              "--max-new-tokens to choose)", file=sys.stderr)
    if chat.context is not None and max_new_tokens >= chat.context:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the model's context holds {chat.context} tokens, prompt "
                        f"included; use at most {chat.context - 1}")
    interactive = sys.stdin.isatty()
    # Piped input: stdout carries only the answers, so scripts can read them line by line.
    info = sys.stdout if interactive else sys.stderr
    if not chat.chat:
        print(f"note: {run_dir} has no chat template: each line is continued as plain text, with no history", file=info)
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform; only line editing is lost
            import readline  # noqa: F401 - line editing and history for input()
        print(f"chatting with {run_dir} (temperature {chat.temperature:g}, max {chat.max_new_tokens} new tokens); {HELP}")
    lines = _lines(interactive)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            message = chat.command(line)
            if message is None:
                break
            print(message, file=info)
            continue
        dropped = chat.dropped
        gen = chat.reply(line)
        if chat.dropped > dropped:
            print(f"note: the context is full; forgot the {chat.dropped - dropped} oldest exchange(s)", file=info)
        if interactive:
            cut = "" if gen.stopped else f"  [cut at {chat.max_new_tokens} tokens; /max to raise]"
            print(f"model> {gen.text}{cut}")
        else:
            print(" ".join(gen.text.splitlines()), flush=True)
    return 0


def _lines(interactive: bool):
    """User lines until EOF (or Ctrl-C at the prompt, which ends the chat quietly)."""
    if not interactive:
        try:
            yield from sys.stdin
        except UnicodeDecodeError:
            raise UserError("stdin: the piped input is not UTF-8 text") from None
        return
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
