"""`posttrain compare`: several models answer one evaluation suite, measured side by side.

Every named model (a finished run directory, or any local Hugging Face model directory) answers the
suite's prompts greedily and `samples` more times by sampling at temperature 1, with the same seeds
for every model. Everything is scored from the answer *text*, never from token ids, so models with
different tokenizers compare fairly:
- the world's gold verifier: gold score and its parts (evaluate.gold_metrics);
- a reward model (`--reward`): its mean score, and win-rates judged by it;
- KL(model || reference): each model's sampled answers scored by itself and by the reference
  (evaluate.sequence_logprobs), the mean log-ratio;
- stop rate, answer length and distinct-n, which need nothing but the answers.
Win-rates pair the greedy answers to each prompt (metrics.win_rate: ties count half, 95% Wilson
interval). A model without a chat template (a base model) is prompted with plain text.

A suite is a small YAML file (eval/world.yaml, eval/generic.yaml):

    prompts: runs/world/data/eval_prompts.jsonl  # `prompt` per row (+ gold fields: kind, expected, ...)
    verifier: runs/world/data    # a world data directory (world.json); needed by the gold metrics
    metrics: [gold, format, facts, safety, sycophancy, skills, style, stop, length, distinct, reward, kl]
    limit: 400                   # the first N prompts (null: all)
    max_new_tokens: 48
    samples: 1                   # sampled answers per prompt (0: greedy only; kl needs at least 1)
    batch_size: 64
    examples: 6                  # side-by-side prompts in the report

The suite's schema is posttrain/recipe.py Suite; the table's rows (key, group, which way is better,
meaning) are posttrain/metrics.py COMPARE_ROWS; rendering is posttrain/report.py.

Writes OUT (default runs/compare): report.md, report.html (self-contained), metrics.json,
answers.jsonl, plots/*.png and DONE, assembled in a temporary directory that is renamed into place.
"""


from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from posttrain.errors import UserError
from posttrain.inputs import read_model_config
from posttrain.metrics import COMPARE_ROWS, METRIC_GROUPS, NEEDS_VERIFIER
from posttrain.recipe import Suite
from posttrain.recipe_file import did_you_mean, read_yaml
from posttrain.report import html_page, markdown, print_tables
from posttrain.runs import atomic_dir, check_output_dir, read_metrics


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; unknown keys and metric names are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--suite {path}: not found; suites live in eval/ (e.g. eval/world.yaml, eval/generic.yaml)")
    raw, _ = read_yaml(path)
    try:
        suite = Suite.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(suite)"
        if err["type"] == "extra_forbidden":
            raise UserError(f"{path}: unknown key {key}{did_you_mean(key, Suite.model_fields)}; "
                            f"suite keys: {', '.join(Suite.model_fields)}") from None
        raise UserError(f"{path}: {key}: {err['msg']}") from None
    for name in suite.metrics:
        if name not in METRIC_GROUPS:
            raise UserError(f"{path}: unknown metric {name!r}{did_you_mean(name, METRIC_GROUPS)}; "
                            f"metrics: {', '.join(METRIC_GROUPS)}")
    if "kl" in suite.metrics and suite.samples == 0:
        raise UserError(f"{path}: metric 'kl' is estimated from sampled answers; set samples: 1 or more, or drop kl")
    return suite


def parse_models(specs: list[str]) -> dict[str, Path]:
    """NAME=RUN_DIR arguments -> {name: directory}, each an existing, finished model directory."""
    from posttrain.runs import require_done

    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{spec!r}: expected NAME=RUN_DIR, e.g. sft=runs/world/sft")
        if not re.fullmatch(r"[\w.-]+", name):
            raise UserError(f"{spec!r}: a model name may use letters, digits, '_', '-' and '.' only")
        if name in models:
            raise UserError(f"{spec!r}: the name {name!r} is given twice; give each model its own name")
        p = Path(path)
        if not p.exists():
            raise UserError(f"{name}={path}: no such run directory")
        require_done(p, name)
        if _stage(p) == "reward":
            raise UserError(f"{name}={path} is a reward model run; pass it as --reward {path}")
        if not ((p / "config.json").exists() or (p / "adapter_config.json").exists() or p.suffix == ".pt"):
            raise UserError(f"{name}={path}: not a model directory (no config.json or adapter_config.json)")
        models[name] = p
    return models


def _check_reward_model(path: Path) -> None:
    """--reward names a reward model: a reward run, or a sequence classifier with one output."""
    if not path.is_dir():
        raise UserError(f"--reward {path}: no such run directory")
    stage = _stage(path)
    config = read_model_config(path) or {}
    one_score = config.get("num_labels", len(config.get("id2label") or {})) == 1 and any(
        a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    if stage not in (None, "reward") or (stage is None and not one_score):
        what = f"a {stage} run" if stage else "not a reward model (a sequence classifier with one output)"
        raise UserError(f"--reward {path}: {what}; pass the directory of a reward run (posttrain reward)")


def _stage(path: Path) -> str | None:
    recipe = path / "recipe.yaml"
    return (yaml.safe_load(recipe.read_text()) or {}).get("stage") if recipe.is_file() else None


def load_rows(suite: Suite, suite_path: str | Path) -> list[dict]:
    """The suite's prompts; gold metrics require a verifier and gold fields on every row."""
    from posttrain import data as datalib

    table = datalib.load(suite.prompts, limit=suite.limit)
    datalib.validate(table, "prompts")
    gold = [m for m in suite.metrics if m in NEEDS_VERIFIER]
    if gold:
        if not suite.verifier:
            raise UserError(f"{suite_path}: metric {gold[0]!r} needs the gold verifier but the suite names none; set "
                            f"verifier: (a world data directory) or drop {', '.join(gold)} from metrics")
        if not (Path(suite.verifier) / "world.json").exists():
            raise UserError(f"{suite_path}: verifier: {suite.verifier} has no world.json; point it at a world data directory")
        bare = next((i for i, r in enumerate(table.rows) if "kind" not in r), None)
        if bare is not None:
            raise UserError(f"{table.where(bare)}: metric {gold[0]!r} (suite {suite_path}) needs gold fields (kind, "
                            f"expected, ...) on every prompt and this row has none; drop {', '.join(gold)} from the "
                            "suite's metrics (eval/generic.yaml has none)")
    return table.rows


@dataclass
class Result:
    """One model's answers and scores, per prompt."""

    name: str
    greedy: list  # evaluate.Generation per prompt
    sampled: list[list] = field(default_factory=list)  # one list of Generations per sampling round
    gold: list[float] | None = None  # gold totals of the greedy answers
    reward: list[float] | None = None  # reward-model scores of the greedy answers
    metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the report must say about these numbers


def measure(name: str, model, tok, rows: list[dict], suite: Suite, *, verifier=None, scorer=None, ref=None,
            seed: int = 0) -> Result:
    """Answer every prompt (greedy, then `suite.samples` sampled rounds) and score the answers.
    `ref` is (reference model, its tokenizer) for KL, or None; the reference itself gets KL 0."""
    from posttrain.evaluate import (
        answer,
        answer_stats,
        distinct_n,
        gold_metrics,
        kl_estimate,
        same_vocab,
        sequence_logprobs,
    )

    kw = {"max_new_tokens": suite.max_new_tokens, "batch_size": suite.batch_size}
    greedy = answer(model, tok, rows, **kw)
    # Seeds far apart per round: generate() reseeds each batch with seed + batch offset.
    sampled = [answer(model, tok, rows, temperature=1.0, seed=seed + 100_003 * (k + 1), **kw) for k in range(suite.samples)]
    flat = [g for gens in sampled for g in gens]
    texts = [g.text for g in greedy]
    m: dict = {**answer_stats(greedy), "mean_words": _mean([len(t.split()) for t in texts]),
               "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
    if flat:
        m["sampled_stop_rate"] = _mean([g.stopped for g in flat])
        m["sampled_distinct_2"] = distinct_n([g.text for g in flat], 2)
    result = Result(name, greedy, sampled)
    if verifier is not None:
        scores = _gold(verifier, rows, greedy, suite, tok)
        m.update(gold_metrics(rows, scores, greedy))
        result.gold = [s.total for s in scores]
        if flat:
            sampled_scores = [s for gens in sampled for s in _gold(verifier, rows, gens, suite, tok)]
            m["sampled_gold_score"] = _mean([s.total for s in sampled_scores])
            m["sampled_format_rate"] = _mean([s.format for s in sampled_scores])
    prompts = [r["prompt"] for r in rows]
    if scorer is not None:
        result.reward = scorer.score(prompts, texts)
        m["reward_score"] = _mean(result.reward)
        if flat:
            m["sampled_reward_score"] = _mean([x for gens in sampled for x in scorer.score(prompts, [g.text for g in gens])])
    if ref is not None:
        ref_model, ref_tok = ref
        if ref_model is model:
            m["kl_to_ref"] = 0.0
        else:  # E_{y ~ model}[log p_model(y|x) - log p_ref(y|x)], over the model's own samples
            diffs, shared = [], same_vocab(tok, ref_tok)  # shared: the sampled ids are scored as sampled
            for gens in sampled:
                args = (prompts, [g.text for g in gens], [g.stop_token for g in gens])
                ids = [g.ids for g in gens] if shared else None
                lp = sequence_logprobs(model, tok, *args, batch_size=suite.batch_size, ids=ids)
                lq = sequence_logprobs(ref_model, ref_tok, *args, batch_size=suite.batch_size, ids=ids)
                diffs += [a - b for a, b in zip(lp, lq, strict=True)]
            est = kl_estimate(diffs)
            m["kl_to_ref"] = est.value
            if not est.valid:
                result.notes.append(f"kl_to_ref of {name}: {est.error()}; shown as -")
    result.metrics = {k: v for k, v in m.items() if COMPARE_ROWS[k][0] in suite.metrics}
    return result


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _gold(verifier, rows: list[dict], gens: list, suite: Suite, tok) -> list:
    chat = tok.chat_template is not None  # a base model continuing text is never in the chat format
    try:
        return [verifier.score(r, g.text, g.stopped, chat) for r, g in zip(rows, gens, strict=True)]
    except KeyError as e:
        raise UserError(f"{suite.prompts}: {e.args[0]}; is verifier {suite.verifier} the world these prompts come from?") from None


def win_rates(results: list[Result], attr: str) -> list[dict]:
    """Each later model against each earlier one (later stages over earlier ones), on paired scores."""
    from posttrain.metrics import win_rate

    return [{"a": a.name, "b": b.name, **win_rate(getattr(a, attr), getattr(b, attr))}
            for i, a in enumerate(results) for b in results[:i]]


def pick_examples(rows: list[dict], results: list[Result], n: int) -> list[int]:
    """Prompts where the models differ most: largest spread of gold score (else reward score, else
    most distinct answers), taken in turn from each prompt kind so that several kinds show."""
    def spread(i: int) -> float:
        for attr in ("gold", "reward"):
            values = [getattr(r, attr)[i] for r in results if getattr(r, attr) is not None]
            if values:
                return max(values) - min(values)
        return 0.0

    def distinct(i: int) -> int:
        return len({r.greedy[i].text for r in results})

    by_kind: dict[str, list[int]] = {}
    for i in sorted(range(len(rows)), key=lambda i: (-spread(i), -distinct(i), i)):
        by_kind.setdefault(str(rows[i].get("kind", "prompt")), []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(rows)):
        for queue in by_kind.values():  # kinds in the order of their largest spread
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


ONLINE = ("ppo", "grpo")  # stages that sample their own answers and log proxy/gold per iteration or step


def ppo_info(name: str, path: Path, rows: list[dict], plots: Path) -> dict:
    """For an online RL run (PPO, GRPO/RLOO): its reward-hacking verdict and a proxy-vs-gold plot from
    its metrics rows."""
    from posttrain.plots import curves

    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    info = {k: summary.get(k) for k in ("reward", "reward_hacking", "reward_hacking_iteration", "reward_hacking_reason",
                                        "final_proxy", "final_gold", "kl_to_ref")}
    info["stage"] = summary.get("algorithm", _stage(path)).upper()
    flag = f" - REWARD HACKING flagged at iteration {info['reward_hacking_iteration']}" if info["reward_hacking"] else ""
    plot = curves(rows, ["proxy", "gold", "eval_proxy", "eval_gold"], plots / f"ppo_{name}.png",
                  f"{name}: proxy (reward model) vs gold reward{flag}")
    info["plot"] = f"plots/{plot.name}" if plot else None
    return info


def gold_curves(runs: dict[str, list[dict]], path: Path) -> Path | None:
    """The gold reward of each online run's answers per PPO iteration or GRPO step (from its metrics
    rows; both sample 32 answers per iteration or step in the world recipes), on one plot: which
    reward signal and which method raises the true score fastest."""
    from posttrain.plots import curves

    rows = [{"step": r["step"], name: r["gold"]} for name, metrics in runs.items() for r in metrics if "gold" in r]
    return curves(rows, list(runs), path, "gold reward of the sampled answers per PPO iteration / GRPO step", "gold reward")


def compare(specs: list[str], suite_path: str = "eval/world.yaml", *, reward: str | None = None, ref: str | None = None,
            out: str = "runs/compare", limit: int | None = None, seed: int = 0, prompts: str | None = None,
            force: bool = False) -> Path:
    """The `posttrain compare` command: check every input, answer and score with each model, write OUT.
    A report made from the same inputs (the same models, unchanged since, the same suite and options)
    is kept as it is unless `force`."""
    models = parse_models(specs)
    suite = load_suite(suite_path)
    suite = suite.model_copy(update={k: v for k, v in {"limit": limit, "prompts": prompts}.items() if v is not None})
    rows = load_rows(suite, suite_path)
    ref = ref or next(iter(models))
    if ref not in models:
        raise UserError(f"--ref {ref}: not one of the models ({', '.join(models)})")
    if reward and "reward" not in suite.metrics:
        raise UserError(f"--reward: suite {suite_path} does not list the metric 'reward'; add it to its metrics")
    if reward:
        _check_reward_model(Path(reward))
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    out_dir = check_output_dir(out, "--out", lambda d: (d / "report.md").exists(), "a compare report")

    inputs = {"models": {n: [str(p), _version(p)] for n, p in models.items()}, "suite": suite.model_dump(mode="json"),
              "prompts_file": _version(Path(suite.prompts)), "reward": [reward, _version(Path(reward)) if reward else None],
              "ref": ref, "seed": seed}
    done = not force and (out_dir / "DONE").exists() and (out_dir / "metrics.json").exists()
    if done and json.loads((out_dir / "metrics.json").read_text()).get("inputs") == inputs:
        print(f"compare: {out_dir} already holds this comparison (same models, suite and options); skipping "
              "(use --force to redo it)")
        return out_dir

    # Inputs are all checked; only now the heavy imports, so mistakes are reported at once.
    from posttrain.models import context_length, device, load_causal_lm, load_tokenizer
    from posttrain.templates import prompt_ids

    notes = []
    verifier = scorer = None
    if suite.verifier and NEEDS_VERIFIER & set(suite.metrics):
        from posttrain.world.verifier import Verifier

        verifier = Verifier.from_dir(suite.verifier)
    dev = device()
    if reward:
        from posttrain.preference import RewardScorer

        scorer = RewardScorer.load(reward, dev)  # refuses an unfinished run
    elif "reward" in suite.metrics:
        notes.append("no --reward given: reward-model scores and win-rates are left out")

    # The reference first, so it stays loaded while the others are measured against it.
    order = [ref] + [n for n in models if n != ref]
    results: dict[str, Result] = {}
    info: dict[str, dict] = {}
    ref_pair = None
    for name in order:
        tok = load_tokenizer(str(models[name]))
        model = load_causal_lm(str(models[name]), tokenizer=tok).to(dev)
        need = max(len(prompt_ids(tok, r["prompt"])) for r in rows) + suite.max_new_tokens
        limit_ = context_length(model)
        if limit_ is not None and need > limit_:
            raise UserError(f"{name}: the longest prompt plus max_new_tokens={suite.max_new_tokens} is {need} tokens, more "
                            f"than the model's context ({limit_}); lower max_new_tokens in {suite_path}")
        info[name] = {"path": str(models[name]), "stage": _stage(models[name]), "chat_template": bool(tok.chat_template)}
        if not tok.chat_template:
            notes.append(f"{name} has no chat template: it is prompted with plain text, outside any chat format")
        if name == ref and "kl" in suite.metrics:
            ref_pair = (model, tok)
        print(f"compare: {name} ({models[name]}) answering {len(rows)} prompts ...", flush=True)
        results[name] = measure(name, model, tok, rows, suite, verifier=verifier, scorer=scorer, ref=ref_pair, seed=seed)
    ordered = [results[n] for n in models]
    notes += [note for r in ordered for note in r.notes]

    report = {
        "suite": str(suite_path), "prompts": suite.prompts, "n_prompts": len(rows), "seed": seed,
        "samples": suite.samples, "max_new_tokens": suite.max_new_tokens, "verifier": suite.verifier if verifier else None,
        "ref": ref if "kl" in suite.metrics else None, "reward": reward, "models": info,
        "metrics": {r.name: r.metrics for r in ordered},
        "win_rates": {k: win_rates(ordered, k) for k in ("gold", "reward") if k in suite.metrics and getattr(ordered[0], k)},
        "notes": notes, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "inputs": inputs,
    }
    report["examples"] = [
        {"prompt": _text(rows[i]["prompt"]), "kind": rows[i].get("kind"),
         "answers": {r.name: {"text": r.greedy[i].text, "stopped": r.greedy[i].stopped,
                              "gold": r.gold[i] if r.gold else None, "reward": r.reward[i] if r.reward else None}
                     for r in ordered}}
        for i in pick_examples(rows, ordered, suite.examples)]
    _write(out_dir, report, rows, ordered, models)
    print_tables(report)
    print(f"compare done: {out_dir}/report.html (also report.md, metrics.json, answers.jsonl, plots/)")
    return out_dir


def _version(path: Path) -> str | None:
    """What identifies the state of a model directory or file: a run's DONE stamp, else the newest
    modification time of its files."""
    path = Path(path)
    if (path / "DONE").is_file():
        return f"{(path / 'DONE').read_text().strip()} {(path / 'DONE').stat().st_mtime_ns}"
    if path.is_file():
        return str(path.stat().st_mtime_ns)
    return str(max((f.stat().st_mtime_ns for f in path.iterdir() if f.is_file()), default=0)) if path.is_dir() else None


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _write(out: Path, report: dict, rows: list[dict], results: list[Result], models: dict[str, Path]) -> None:
    """Everything goes into a temporary sibling directory, DONE last, which then replaces OUT at once,
    so OUT never holds half a report."""
    with atomic_dir(out) as tmp:
        _write_into(tmp, report, rows, results, models)


def _write_into(tmp: Path, report: dict, rows: list[dict], results: list[Result], models: dict[str, Path]) -> None:
    from posttrain.plots import bars, grouped_bars

    plots = tmp / "plots"
    plots.mkdir(parents=True)
    table = report["metrics"]
    made = [grouped_bars(table, ["gold_score", "format_rate", "stop_rate", "fact_accuracy", "fact_accuracy_heldout",
                                 "refusal_rate", "over_refusal_rate", "sycophancy_rate", "distinct_2"],
                         plots / "metrics.png", "main metrics by model", ylim=(0, 1.05))]
    for key in ("reward_score", "kl_to_ref", "mean_words"):
        if all(m.get(key) is not None for m in table.values()):
            made.append(bars({n: m[key] for n, m in table.items()}, plots / f"{key}.png", key))
    ppo_rows = {name: read_metrics(path) for name, path in models.items() if _stage(path) in ONLINE}
    report["ppo"] = {name: ppo_info(name, models[name], rows, plots) for name, rows in ppo_rows.items()}
    if len(ppo_rows) > 1:  # e.g. PPO through the reward model vs on the gold verifier, or PPO vs GRPO
        made.append(gold_curves(ppo_rows, plots / "ppo_gold_curves.png"))
    report["plots"] = [f"plots/{p.name}" for p in made if p is not None]

    (tmp / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    with (tmp / "answers.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            rec = {"prompt": row["prompt"], **{k: row[k] for k in ("kind", "group") if k in row}, "answers": {
                r.name: {"greedy": r.greedy[i].text, "stopped": r.greedy[i].stopped,
                         **({"gold": r.gold[i]} if r.gold else {}), **({"reward": r.reward[i]} if r.reward else {}),
                         **({"samples": [gens[i].text for gens in r.sampled]} if r.sampled else {})}
                for r in results}}
            f.write(json.dumps(rec) + "\n")
    (tmp / "report.md").write_text(markdown(report))
    (tmp / "report.html").write_text(html_page(report, tmp))
    (tmp / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
