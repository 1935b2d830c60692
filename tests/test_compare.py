"""posttrain compare: every model answers the same suite; the report has a column per model, win-rates
with intervals, side-by-side examples, and a self-contained HTML page. Bad input is a one-line error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, cli, write

from posttrain.compare import load_suite
from posttrain.metrics import METRIC_GROUPS

WORLD_SUITE = """\
prompts: {data}/eval_prompts.jsonl
verifier: {data}
metrics: [gold, format, facts, safety, sycophancy, skills, style, stop, length, distinct, reward, kl]
limit: 16
max_new_tokens: 12
samples: 1
examples: 4
"""


@pytest.fixture(scope="module")
def world_report(tmp_path_factory, small_world, tiny_base, tiny_sft, tiny_reward):
    """base and sft compared on 16 world prompts, with the reward model: (out dir, CLI result)."""
    tmp = tmp_path_factory.mktemp("compare")
    suite = write(tmp / "world.yaml", WORLD_SUITE.format(data=small_world))
    out = tmp / "report"
    proc = cli("compare", f"base={tiny_base}", f"sft={tiny_sft}", "--suite", str(suite), "--reward", str(tiny_reward),
               "--out", str(out), check=True)
    return out, proc


def test_world_report_has_a_column_per_model(world_report):
    out, proc = world_report
    for name in ("report.md", "report.html", "metrics.json", "answers.jsonl", "plots/metrics.png", "DONE"):
        assert (out / name).exists(), name
    assert not list(out.parent.glob(".report.*")), "the temporary directory was left behind"
    rep = json.loads((out / "metrics.json").read_text())
    assert list(rep["metrics"]) == ["base", "sft"]
    for name in ("base", "sft"):
        for key in ("gold_score", "format_rate", "stop_rate", "fact_accuracy", "refusal_rate", "reward_score",
                    "sampled_gold_score", "kl_to_ref", "mean_tokens", "mean_words", "distinct_2"):
            assert key in rep["metrics"][name], (name, key)
    # The base model has no chat template: prompted with plain text, it never meets the answer format.
    assert rep["models"]["base"]["chat_template"] is False and rep["models"]["sft"]["chat_template"] is True
    assert rep["metrics"]["base"]["format_rate"] == 0.0
    assert rep["ref"] == "base" and rep["metrics"]["base"]["kl_to_ref"] == 0.0
    assert rep["metrics"]["sft"]["kl_to_ref"] != 0.0
    for judge in ("gold", "reward"):
        (w,) = rep["win_rates"][judge]
        assert (w["a"], w["b"], w["n"]) == ("sft", "base", 16)
        assert 0.0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1.0
    assert len(rep["examples"]) == 4 and len({e["kind"] for e in rep["examples"]}) >= 2
    assert all(set(e["answers"]) == {"base", "sft"} for e in rep["examples"])
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 16 and len(json.loads(lines[0])["answers"]["sft"]["samples"]) == 1
    assert "gold_score" in proc.stdout and "reward model" in proc.stdout  # the terminal tables


def test_report_html_is_self_contained(world_report):
    out, _ = world_report
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "the report must not fetch anything"
    assert "<style>" in page and page.count("data:image/png;base64,") >= 2
    assert "<td>gold_score</td>" in page and "Side-by-side examples" in page and "Win rates" in page
    rep = json.loads((out / "metrics.json").read_text())
    import html

    for example in rep["examples"]:
        assert html.escape(example["prompt"]) in page
    md = (out / "report.md").read_text()
    assert "| gold_score |" in md and "![metrics](plots/metrics.png)" in md


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(world_report, tmp_path):
    out, _ = world_report
    png = tmp_path / "report.png"
    subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2000",
                    f"file://{out / 'report.html'}"], capture_output=True, timeout=120, check=False)
    assert png.exists() and png.stat().st_size > 20_000  # a blank 1200x2000 page is a few kB


def test_generic_suite_reports_what_needs_no_verifier(tmp_path, tiny_base, tiny_sft, tiny_reward):
    """The shipped eval/generic.yaml: prompts without gold fields, any models."""
    out = tmp_path / "generic"
    cli("compare", f"sft={tiny_sft}", f"base={tiny_base}", "--suite", "eval/generic.yaml", "--limit", "6",
        "--reward", str(tiny_reward), "--out", str(out), check=True)
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["n_prompts"] == 6 and rep["verifier"] is None and rep["ref"] == "sft"
    for name in ("sft", "base"):
        assert {"stop_rate", "mean_words", "distinct_2", "reward_score", "kl_to_ref"} <= set(rep["metrics"][name])
        assert not {"gold_score", "format_rate", "fact_accuracy"} & set(rep["metrics"][name])
    assert list(rep["win_rates"]) == ["reward"]
    assert "gold_score" not in (out / "report.md").read_text()


def test_gold_metrics_need_a_verifier_and_gold_fields(tmp_path, small_world, tiny_sft):
    no_verifier = write(tmp_path / "a.yaml", "prompts: eval/generic_prompts.jsonl\nmetrics: [stop, gold]\n")
    proc = cli("compare", f"sft={tiny_sft}", "--suite", str(no_verifier), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "'gold'" in proc.stderr and str(no_verifier) in proc.stderr
    no_gold_fields = write(tmp_path / "b.yaml", f"prompts: eval/generic_prompts.jsonl\nverifier: {small_world}\n"
                                                "metrics: [facts]\n")
    proc = cli("compare", f"sft={tiny_sft}", "--suite", str(no_gold_fields), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "'facts'" in proc.stderr and "eval/generic_prompts.jsonl:1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_bad_input_is_a_one_line_error(tmp_path, tiny_sft):
    unfinished = write(tmp_path / "half" / "recipe.yaml", "stage: sft\n").parent
    typo = write(tmp_path / "typo.yaml", "prompts: eval/generic_prompts.jsonl\nmax_tokens: 8\n")
    bad_metric = write(tmp_path / "metric.yaml", "prompts: eval/generic_prompts.jsonl\nmetrics: [rewards]\n")
    cases = [
        ([str(tiny_sft)], "expected NAME=RUN_DIR"),
        ([f"a={tiny_sft}", f"a={tiny_sft}"], "given twice"),
        ([f"a={tmp_path / 'nope'}"], "no such run directory"),
        ([f"a={unfinished}"], "unfinished run"),
        ([f"a={tiny_sft}", "--suite", str(typo)], "unknown key max_tokens (did you mean 'max_new_tokens'?)"),
        ([f"a={tiny_sft}", "--suite", str(bad_metric)], "unknown metric 'rewards' (did you mean 'reward'?)"),
        ([f"a={tiny_sft}", "--suite", "eval/generic.yaml", "--ref", "b"], "--ref b: not one of the models"),
        ([f"a={tiny_sft}", "--suite", "eval/generic.yaml", "--out", str(tiny_sft)], "is not a compare report"),
    ]
    for args, message in cases:
        proc = cli("compare", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_shipped_suites_are_valid():
    for path in sorted((ROOT / "eval").glob("*.yaml")):
        suite = load_suite(path)
        assert set(suite.metrics) <= set(METRIC_GROUPS)
    assert {"gold", "format", "kl"} <= set(load_suite(ROOT / "eval" / "world.yaml").metrics)


def test_a_ppo_run_gets_its_proxy_vs_gold_curve(tmp_path, tiny_sft):
    """A model whose recipe says stage: ppo brings its reward curves and reward-hacking verdict along
    (here the SFT model dressed up with a PPO run's files, so no PPO training is needed)."""
    ppo = tmp_path / "ppo"
    shutil.copytree(tiny_sft, ppo, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    (ppo / "recipe.yaml").write_text("stage: ppo\n")
    (ppo / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "proxy": 0.1 * i, "gold": 0.5 - 0.03 * i, **({"eval_gold": 0.4} if i % 5 == 0 else {})}) + "\n"
        for i in range(1, 11)))
    (ppo / "summary.json").write_text(json.dumps({"reward": "1 x reward model r", "reward_hacking": True,
                                                  "reward_hacking_iteration": 6, "reward_hacking_reason": "proxy up, gold down"}))
    out = tmp_path / "out"
    cli("compare", f"sft={tiny_sft}", f"ppo={ppo}", "--suite", "eval/generic.yaml", "--limit", "4", "--out", str(out),
        check=True)
    rep = json.loads((out / "metrics.json").read_text())
    assert list(rep["ppo"]) == ["ppo"] and rep["ppo"]["ppo"]["reward_hacking"] is True
    assert (out / "plots" / "ppo_ppo.png").exists()
    assert "reward hacking flagged** at iteration 6" in (out / "report.md").read_text()


def test_the_same_comparison_again_is_skipped_until_a_model_changes(world_report, tiny_base, tiny_sft, tiny_reward,
                                                                     small_world, tmp_path):
    out, _ = world_report
    suite = out.parent / "world.yaml"
    args = ("compare", f"base={tiny_base}", f"sft={tiny_sft}", "--suite", str(suite), "--reward", str(tiny_reward),
            "--out", str(out))
    stamp = (out / "DONE").read_text()
    again = cli(*args, check=True)
    assert "already holds this comparison" in again.stdout and (out / "DONE").read_text() == stamp
    other = cli(*args[:-1], str(tmp_path / "r2"), "--limit", "4", check=True)  # other options: measured anew
    assert "already holds" not in other.stdout and (tmp_path / "r2" / "DONE").exists()
