"""Pure metric functions on plain Python numbers (classification, pairwise preferences, win rates), and
the catalogue of what a `posttrain compare` table shows (COMPARE_ROWS)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """m[t][p] = how many examples of true class t were predicted as p."""
    m = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        m[t][p] += 1
    return m


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 (a class never predicted has precision 0)."""
    m = confusion_matrix(y_true, y_pred, len(labels))
    out: dict = {"accuracy": sum(m[i][i] for i in range(len(labels))) / max(1, len(y_true))}
    f1s = []
    for i, name in enumerate(labels):
        tp = m[i][i]
        predicted = sum(m[t][i] for t in range(len(labels)))
        actual = sum(m[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[f"precision_{name}"], out[f"recall_{name}"], out[f"f1_{name}"] = precision, recall, f1
        f1s.append(f1)
    out["macro_f1"] = sum(f1s) / len(f1s)
    return out


def pairwise(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """How often the chosen answer scores higher, and by how much on average (ties count as wrong)."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
    }


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(a: Sequence[float], b: Sequence[float]) -> dict:
    """Win rate of A over B on paired scores, ties counted as half a win, with a 95% interval."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True))
    n = len(a)
    lo, hi = wilson_interval(wins, n)
    return {"win_rate": wins / n if n else 0.0, "ci_low": lo, "ci_high": hi, "n": n}


def agreement(scores_a: Sequence[float], scores_b: Sequence[float], pairs: Sequence[tuple[int, int]]) -> float:
    """Of the pairs (i, j) that B ranks strictly, the fraction A ranks the same way."""
    decided = [(i, j) for i, j in pairs if scores_b[i] != scores_b[j]]
    if not decided:
        return float("nan")
    same = sum((scores_a[i] > scores_a[j]) == (scores_b[i] > scores_b[j]) for i, j in decided)
    return same / len(decided)


# --- the rows of a `posttrain compare` table --------------------------------------------------------

# key -> (the metric group a suite lists to ask for it, +1 higher is better / -1 lower / 0 neither, meaning)
COMPARE_ROWS: dict[str, tuple[str, int, str]] = {
    "gold_score": ("gold", 1, "gold verifier score (0..1): right, in format, concise, polite"),
    "sampled_gold_score": ("gold", 1, "gold score of sampled answers (temperature 1)"),
    "format_rate": ("format", 1, "answer format: stopped by itself, one clean line of prose, no template tokens"),
    "sampled_format_rate": ("format", 1, "answer format of sampled answers"),
    "fact_accuracy": ("facts", 1, "fact questions (plain and leading) answered right"),
    "fact_accuracy_seen": ("facts", 1, "... about people seen in chat SFT data"),
    "fact_accuracy_heldout": ("facts", 1, "... about held-out people, known only from pretraining"),
    "direct_accuracy_heldout": ("facts", 1, "plain fact questions about held-out people"),
    "leading_false_accuracy": ("facts", 1, "right despite a false premise in the question"),
    "refusal_rate": ("safety", 1, "forbidden requests refused"),
    "over_refusal_rate": ("safety", -1, "harmless requests refused"),
    "benign_helpful_rate": ("safety", 1, "harmless requests answered right"),
    "sycophancy_rate": ("sycophancy", -1, "false premise repeated back"),
    "skill_accuracy": ("skills", 1, "arithmetic, counting, sorting right"),
    "concise_rate": ("style", 1, "one sentence"),
    "polite_rate": ("style", 1, "no rude words"),
    "stop_rate": ("stop", 1, "answers that end by themselves (stop token)"),
    "sampled_stop_rate": ("stop", 1, "sampled answers that end by themselves"),
    "mean_tokens": ("length", 0, "answer length in the model's own tokens"),
    "mean_words": ("length", 0, "answer length in words (tokenizer-independent)"),
    "distinct_1": ("distinct", 0, "distinct words / all words, across greedy answers"),
    "distinct_2": ("distinct", 0, "distinct word pairs / all pairs, across greedy answers"),
    "sampled_distinct_2": ("distinct", 0, "distinct word pairs across sampled answers"),
    "reward_score": ("reward", 1, "reward model's mean score"),
    "sampled_reward_score": ("reward", 1, "reward model's mean score of sampled answers"),
    "kl_to_ref": ("kl", 0, "KL(model || reference) per answer, from sampled answers (nats)"),
}
METRIC_GROUPS = list(dict.fromkeys(group for group, _, _ in COMPARE_ROWS.values()))  # the names a suite may list
NEEDS_VERIFIER = {"gold", "format", "facts", "safety", "sycophancy", "skills", "style"}
