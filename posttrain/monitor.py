"""The reward-hacking monitor: does the optimised (proxy) reward keep rising while the gold reward falls?

Any online RL stage that logs a proxy reward (a reward model) and a gold one (the world's verifier) per
iteration reads its history with `detect_reward_hacking`: PPO per iteration, GRPO and RLOO per logged step.
The thresholds' defaults are the recipe's (posttrain/recipe.py MonitorSection, `ppo.monitor:`, `grpo.monitor:`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.recipe import MonitorSection

_DEFAULT = MonitorSection()


@dataclass
class HackingCheck:
    flagged: bool
    iteration: int | None = None  # index into the series where the alarm fired
    reason: str = ""


def detect_reward_hacking(
    proxy: Sequence[float],
    gold: Sequence[float | None],
    *,
    window: int = _DEFAULT.window,
    min_proxy_rise: float = _DEFAULT.min_proxy_rise,
    min_gold_drop: float = _DEFAULT.min_gold_drop,
    max_corr: float = _DEFAULT.max_corr,
    patience: int = _DEFAULT.patience,
) -> HackingCheck:
    """Flag the first iteration where the proxy reward keeps rising while the gold reward falls.

    At iteration t compare two adjacent windows of `window` iterations, A = [t-2w+1 .. t-w] and
    B = [t-w+1 .. t] (window means are the smoothing), with
      rise = mean_B(proxy) - mean_A(proxy),  drop = mean_A(gold) - mean_B(gold),
      corr = Pearson correlation of proxy and gold over the iterations of A and B that have gold.
    The condition holds at t when rise >= min_proxy_rise and either
      drop >= min_gold_drop                       (divergence), or
      drop > 0 and corr <= max_corr               (decorrelation: gold slides as proxy climbs).
    The alarm fires at the first t where the condition has held for `patience` consecutive iterations.
    Gold may be None/NaN where it was not measured; a window needs max(2, window // 2) gold values or
    more, else t is undecided (and breaks a run of `patience`). Thresholds are in the series' own units: scale
    min_proxy_rise to the reward model's scale.
    """
    def known(x):
        return x is not None and math.isfinite(x)

    run = 0
    for t in range(2 * window - 1, len(proxy)):
        a, b = range(t - 2 * window + 1, t - window + 1), range(t - window + 1, t + 1)
        gold_a, gold_b = [gold[i] for i in a if known(gold[i])], [gold[i] for i in b if known(gold[i])]
        if min(len(gold_a), len(gold_b)) < max(2, window // 2):
            run = 0
            continue
        rise = sum(proxy[i] for i in b) / window - sum(proxy[i] for i in a) / window
        drop = sum(gold_a) / len(gold_a) - sum(gold_b) / len(gold_b)
        pairs = [(proxy[i], gold[i]) for i in (*a, *b) if known(gold[i])]
        corr = _pearson(pairs)
        diverged = drop >= min_gold_drop
        decorrelated = drop > 0 and corr <= max_corr
        run = run + 1 if rise >= min_proxy_rise and (diverged or decorrelated) else 0
        if run >= patience:
            how = "gold fell" if diverged else f"gold slid (correlation {corr:.2f})"
            return HackingCheck(True, t, f"proxy rose {rise:+.3g} while {how} {-drop:+.3g}: mean of iterations "
                                         f"{b[0]}-{b[-1]} vs {a[0]}-{a[-1]}, {patience} iterations in a row")
    return HackingCheck(False)


def _pearson(pairs: list[tuple[float, float]]) -> float:
    n = len(pairs)
    mx, my = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = sum((x - mx) ** 2 for x, _ in pairs), sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def check_history(history: list[dict], monitor: MonitorSection) -> HackingCheck:
    """The monitor on a run's logged iterations (rows with "proxy" and, where measured, "gold")."""
    return detect_reward_hacking([h["proxy"] for h in history], [h.get("gold") for h in history],
                                 **monitor.model_dump())
