"""Rewards for the RL stages: the world's gold verifier, a learned reward model, and verifiable
rewards for real data that need no code in a recipe (final number, exact string, choice letter,
format). PPO (stages/ppo.py) and GRPO/RLOO (stages/grpo.py) read prompts and standardise a reward
model the same way, through this module.

A reward here is a callable in TRL's reward-function form, `fn(prompts, completions, completion_ids,
**columns) -> list[float]`, where `columns` are the prompt file's other fields, one value per answer.
It is named after its recipe entry, so TRL logs it as rewards/<name>/mean and rewards/<name>/std.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from posttrain import data as datalib
from posttrain.errors import UserError
from posttrain.templates import prompt_ids

# --- prompts ---------------------------------------------------------------------------------------


def prompt_text(prompt: str | list[dict]) -> str:
    """The words of a prompt: a string as it is, a chat as its messages' contents."""
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


def load_prompts(source: str, columns: list[str] | None, limit: int | None, tok, max_new_tokens: int,
                 max_length: int, overlong: str = "error", need: dict[str, str] | None = None,
                 key: str = "ppo.max_new_tokens", prompt_field: str = "prompt",
                 ) -> tuple[list[dict], list[list[int]], int]:
    """Prompt rows, their token ids, and how many were dropped. Empty prompts are errors; a prompt that
    leaves fewer than `max_new_tokens` of `max_length` for its answer is an error or (overlong="drop")
    dropped. `need`: {field: who reads it}, fields every row must have. `prompt_field`: the column
    that holds the prompt (GSM8K's is `question`); rows get it as `prompt`."""
    table = datalib.load(source, columns, limit)
    datalib.validate(table, "prompts", {"prompt": prompt_field})
    rows, ids, dropped = [], [], 0
    for i, row in enumerate(table):
        row["prompt"] = row[prompt_field]
        if not prompt_text(row["prompt"]).strip():
            raise UserError(f"{table.where(i)}: empty prompt; remove the row")
        for field, who in (need or {}).items():
            if row.get(field) in (None, ""):
                raise UserError(f"{table.where(i)}: no {field!r} field, which {who} reads; add it to every row "
                                "(or point the reward at another field)")
        p = prompt_ids(tok, row["prompt"])
        if len(p) + max_new_tokens > max_length:
            if overlong == "drop":
                dropped += 1
                continue
            raise UserError(f"{table.where(i)}: prompt is {len(p)} tokens, and with {key}={max_new_tokens} it exceeds "
                            f"data.max_length={max_length}; shorten it or raise the limit")
        rows.append(row)
        ids.append(p)
    if not rows:
        raise UserError(f"data.train: every one of {len(table)} prompts leaves fewer than {key}={max_new_tokens} of "
                        f"data.max_length={max_length} tokens for the answer; raise data.max_length (within the model's context)")
    return rows, ids, dropped


# --- verifiable answers ------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number an answer ends on, normalised ("1,234.50" -> "1234.5"); for a GSM8K-style reference
    ("... #### 42") the number after the last ####. None when there is none."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: what exact match compares."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


_CHOICE = re.compile(r"(?:answer|choice|option)\s*(?:is|:)?\s*\(?([A-J])\)?(?![A-Za-z])")
# "(B) ...", "B) ...", "B. ...", "B: ...", or "B" alone; not "I do not know" or "A cat".
_LEADING_CHOICE = re.compile(r"^\s*(?:\(([A-J])\)|([A-J])(?:[).:]|\s*$))")


def choice_letter(text: str) -> str | None:
    """The choice an answer picks: "The answer is (C)", "answer: C", or an answer that starts with the letter."""
    m = _CHOICE.search(text)
    if m:
        return m.group(1)
    m = _LEADING_CHOICE.match(text)
    return (m.group(1) or m.group(2)) if m else None


# --- reward functions ------------------------------------------------------------------------------


def _completion_text(completion: str | list[dict]) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


class Reward:
    """A reward named after its recipe entry. `stop_ids` tell whether an answer ended its turn by itself.
    With `group` (answers per prompt) and prompts that carry a `kind` (the world's), it also logs, per
    kind, the share of groups whose answers all got the same reward: rewards/<name>/zero_std/<kind>."""

    def __init__(self, name: str, stop_ids: list[int], group: int | None = None):
        self.__name__ = name
        self.stop_ids = set(stop_ids)
        self.group = group

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        texts = [_completion_text(c) for c in completions]
        stopped = [bool(ids) and ids[-1] in self.stop_ids for ids in completion_ids]
        rows = [{k: v[i] for k, v in columns.items() if isinstance(v, list) and v[i] is not None}
                for i in range(len(texts))]
        for row, prompt in zip(rows, prompts, strict=True):
            row["prompt"] = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        scores = self.score(rows, texts, stopped)
        log = columns.get("log_metric")
        if log is not None and self.group:
            for kind, share in zero_std_by_kind(rows, scores, self.group).items():
                log(f"rewards/{self.__name__}/zero_std/{kind}", share)
        return scores

    def score(self, rows: list[dict], texts: list[str], stopped: list[bool]) -> list[float]:
        raise NotImplementedError


def zero_std_by_kind(rows: list[dict], scores: list[float], group: int) -> dict[str, float]:
    """{prompt kind: share of its groups whose answers all scored the same}. A group is a run of
    `group` answers to one prompt; a group split between processes (shorter here) is left out."""
    runs: list[list[int]] = []
    for i, row in enumerate(rows):
        if runs and rows[runs[-1][0]]["prompt"] == row["prompt"] and len(runs[-1]) < group:
            runs[-1].append(i)
        else:
            runs.append([i])
    flat: dict[str, list[bool]] = {}
    for run in runs:
        kind = rows[run[0]].get("kind")
        if kind is not None and len(run) == group:
            flat.setdefault(kind, []).append(max(scores[i] for i in run) - min(scores[i] for i in run) < 1e-9)
    return {k: sum(v) / len(v) for k, v in sorted(flat.items())}


class Gold(Reward):
    """The world's gold verifier (posttrain/world/verifier.py): format x correctness, minus penalties."""

    def __init__(self, name: str, stop_ids: list[int], data_dir: str | Path, group: int | None = None):
        super().__init__(name, stop_ids, group)
        from posttrain.world.verifier import Verifier

        self.verifier = Verifier.from_dir(data_dir)

    def score(self, rows, texts, stopped):
        return [self.verifier.score(r, t, s).total for r, t, s in zip(rows, texts, stopped, strict=True)]


class RewardModel(Reward):
    """A reward run's score in standard deviations of the starting policy's answers (`norm`)."""

    def __init__(self, name: str, stop_ids: list[int], scorer, norm: tuple[float, float]):
        super().__init__(name, stop_ids)
        self.scorer, self.norm = scorer, norm

    def score(self, rows, texts, stopped):
        mu, sigma = self.norm
        return [(s - mu) / sigma for s in self.scorer.score([r["prompt"] for r in rows], texts)]


class Match(Reward):
    """1 when the answer's final number / normalised text / choice letter equals the reference field's."""

    EXTRACT = {"final_number": final_number, "exact": normalise, "choice": choice_letter}

    def __init__(self, name: str, stop_ids: list[int], kind: str, field: str):
        super().__init__(name, stop_ids)
        self.extract, self.field = self.EXTRACT[kind], field

    def reference(self, value) -> str | None:
        value = str(value)
        if self.extract is choice_letter:
            return choice_letter(value) or value.strip().strip("()").upper()[:1] or None
        return self.extract(value)

    def score(self, rows, texts, stopped):
        out = []
        for r, t in zip(rows, texts, strict=True):
            ref = self.reference(r[self.field])
            out.append(float(ref is not None and self.extract(t) == ref))
        return out


class Format(Reward):
    """1 when the answer ends its turn by itself and (with a regex) matches it."""

    def __init__(self, name: str, stop_ids: list[int], regex: str | None):
        super().__init__(name, stop_ids)
        self.regex = re.compile(regex) if regex else None

    def score(self, rows, texts, stopped):
        return [float(s and (self.regex is None or self.regex.search(t) is not None)) for t, s in zip(texts, stopped, strict=True)]


def build(sources, stop_ids: list[int], scorer_for=None, group: int | None = None) -> list[Reward]:
    """The recipe's reward entries (recipe.RewardSource) as reward functions. `scorer_for(path)` returns
    (RewardScorer, (mean, std)) for a reward run; `group`: answers per prompt (for the gold reward's
    zero-variance share by prompt kind)."""
    out: list[Reward] = []
    for s in sources:
        if s.source == "gold":
            out.append(Gold(s.label, stop_ids, s.path, group))
        elif s.source == "reward_model":
            scorer, norm = scorer_for(s.path)
            out.append(RewardModel(s.label, stop_ids, scorer, norm))
        elif s.source == "format":
            out.append(Format(s.label, stop_ids, s.regex))
        else:
            out.append(Match(s.label, stop_ids, s.source, s.field))
    return out


def fields_needed(sources) -> dict[str, str]:
    """{prompt field: which reward reads it}, for the rows' check in load_prompts."""
    need = {}
    for i, s in enumerate(sources):
        if s.field:
            need[s.field] = f"grpo.rewards.{i} ({s.source})"
        if s.source == "gold":
            need["kind"] = f"grpo.rewards.{i} (gold: the world's prompt files carry it)"
    return need


# --- reward models -------------------------------------------------------------------------------


def proxy_norm(scorer, policy, tok, rows: list[dict], max_new_tokens: int, temperature: float,
               seed: int) -> tuple[float, float]:
    """Mean and standard deviation of a reward model on the starting policy's own sampled answers: the
    proxy is reported in these units, so its size (and the hacking monitor's thresholds) mean the same
    for any reward model."""
    from posttrain.evaluate import answer

    gens = answer(policy, tok, rows, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    raw = torch.tensor(scorer.score([r["prompt"] for r in rows], [g.text for g in gens]))
    return raw.mean().item(), max(raw.std().item(), 1e-6)
