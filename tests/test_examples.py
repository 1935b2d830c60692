"""recipes/examples/*.yaml on the real data in ../shared/data: each recipe validates offline, and the
data loads as the recipes expect (all SMS rows, the fixed seeded splits, the degenerate preference
pairs). The runs themselves are `make examples` (minutes each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA, cli, write

from posttrain import evaluate
from posttrain.errors import UserError
from posttrain.preference import load_pairs, load_train_eval
from posttrain.recipe import EvalSection
from posttrain.recipe_file import load_recipe
from posttrain.stages.classify import load_splits

EXAMPLES = ROOT / "recipes" / "examples"
SMS = SHARED_DATA / "sms_spam_collection" / "SMSSpamCollection"
PREFS = SHARED_DATA / "llms_from_scratch" / "instruction-data-with-preference.json"
pytestmark = pytest.mark.skipif(not SMS.is_file() or not PREFS.is_file(), reason=f"{SHARED_DATA} (SMS spam, LLMs-from-scratch ch. 7 data) is absent")

RECIPES = ["sms_spam", "alpaca_sft", "pref_reward", "pref_dpo", "gsm8k_grpo"]


def stand_in_run(path: Path) -> Path:
    """A finished run directory, enough for `validate` (it checks existence and DONE, loads nothing)."""
    write(path / "recipe.yaml", "stage: sft\n")
    write(path / "DONE", "")
    return path


@pytest.mark.parametrize("name", RECIPES)
def test_example_recipe_validates_offline(name, tmp_path):
    # model.path is a run made by an earlier stage (runs/world/base, runs/examples/alpaca_sft), so it
    # points at a finished stand-in; every data path is the recipe's own, relative to the repo root.
    model = stand_in_run(tmp_path / "model")
    proc = cli("validate", "--offline", str(EXAMPLES / f"{name}.yaml"), "--set", f"model.path={model}")
    assert proc.returncode == 0, proc.stderr
    assert f"ok ({load_recipe(EXAMPLES / f'{name}.yaml').stage} recipe, output_dir runs/examples/{name}" in proc.stdout


def test_example_recipes_chain():
    recipes = {n: load_recipe(EXAMPLES / f"{n}.yaml") for n in RECIPES}
    assert recipes["sms_spam"].model.path == recipes["alpaca_sft"].model.path == "runs/world/base"
    assert recipes["pref_reward"].model.path == recipes["pref_dpo"].model.path == recipes["alpaca_sft"].output_dir
    for name, recipe in recipes.items():
        assert recipe.output_dir == f"runs/examples/{name}"


def test_sms_recipe_loads_every_row_into_fixed_disjoint_splits():
    recipe = load_recipe(EXAMPLES / "sms_spam.yaml")
    splits = load_splits(recipe)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"test": 557, "val": 502, "train": 4515} and sum(sizes.values()) == 5574
    labels = [r["label"] for t in splits.values() for r in t]
    assert labels.count("ham") == 4827 and labels.count("spam") == 747
    assert all({r["label"] for r in t} == {"ham", "spam"} for t in splits.values())
    lines = [set(t.lines) for t in splits.values()]
    assert sum(map(len, lines)) == len(set().union(*lines)) == 5574  # disjoint, nothing lost
    again = load_splits(load_recipe(EXAMPLES / "sms_spam.yaml"))
    assert all(again[k].lines == splits[k].lines for k in splits)  # the seed fixes the split


def test_preference_set_has_six_degenerate_pairs():
    pairs, counts = load_pairs(str(PREFS))
    assert counts == {"pairs": 1094, "degenerate_skipped": 6} and len(pairs) == 1094


def test_reward_and_dpo_hold_out_the_same_seeded_records():
    reward, dpo = load_recipe(EXAMPLES / "pref_reward.yaml"), load_recipe(EXAMPLES / "pref_dpo.yaml")
    (r_train, r_counts), (r_eval, r_eval_counts) = load_train_eval(reward.data, reward.reward.eval_split, reward.seed)
    (d_train, _), (d_eval, _) = load_train_eval(dpo.data, dpo.dpo.eval_split, dpo.seed)
    assert r_eval == d_eval and r_train == d_train
    assert r_counts["degenerate_skipped"] + r_eval_counts.get("degenerate_skipped", 0) == 6
    assert r_counts["pairs"] + r_eval_counts["pairs"] == 1094 and r_eval_counts["pairs"] + r_eval_counts["degenerate_skipped"] == 110
    prompts = {json.dumps(p["prompt"]) + json.dumps(p["chosen"]) for p in r_train}
    assert not any(json.dumps(p["prompt"]) + json.dumps(p["chosen"]) in prompts for p in r_eval)
    (_, _), (other, _) = load_train_eval(reward.data, 0.1, seed=1)
    assert other != r_eval  # another seed, another split


def test_eval_split_rules(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": "A", "rejected": "B"} for i in range(10)]
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    recipe = write(tmp_path / "r.yaml", f"stage: dpo\nmodel: {{path: m}}\ndata: {{train: {path}, eval: {path}}}\n"
                                        "dpo: {eval_split: 0.2}\noutput_dir: out\n")
    with pytest.raises(UserError, match="dpo.eval_split: data.eval is given too"):
        load_recipe(recipe)
    full = load_recipe(recipe, ["data.eval=null"]).data
    (_, _), (held_all, _) = load_train_eval(full, 0.2, seed=0)
    data = load_recipe(recipe, ["data.eval=null", "data.limit=3"]).data
    (train, _), (held, _) = load_train_eval(data, 0.2, seed=0)
    # the limit applies to what is left after the split, and the eval pairs shrink in proportion (3 x 0.2 / 0.8),
    # taken from the same held-out records
    assert len(held_all) == 2 and len(held) == 1 and len(train) == 3
    assert {p["prompt"] for p in held} < {p["prompt"] for p in held_all}
    assert not {p["prompt"] for p in held_all} & {p["prompt"] for p in train}
    with pytest.raises(UserError, match="reward.eval_split: 0.01 of 10 records .* leaves no eval record"):
        load_train_eval(data, 0.01, seed=0, key="reward.eval_split")


def test_alpaca_records_are_eval_prompts(tmp_path, monkeypatch):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
            {"instruction": "Translate.", "input": "Hallo", "output": "Hello"}]
    path = write(tmp_path / "a.json", json.dumps(rows))
    seen = []
    monkeypatch.setattr(evaluate, "answer", lambda model, tok, rows, **kw: seen.extend(rows) or
                        [evaluate.Generation("Red.", True, 2) for _ in rows])
    result = evaluate.evaluate_prompts(None, None, EvalSection(prompts=str(path), show=0), tmp_path)
    assert [r["prompt"] for r in seen] == ["Name a colour.", "Translate.\n\n### Input:\nHallo"]
    assert result.metrics["stop_rate"] == 1.0


def test_eval_prompts_that_leave_no_room_for_an_answer_are_skipped_and_counted(tmp_path, monkeypatch):
    from types import SimpleNamespace

    rows = [{"prompt": "one two three"}, {"prompt": " ".join(["word"] * 9)}, {"prompt": "four five"}]
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    model = SimpleNamespace(config=SimpleNamespace(n_positions=10))  # a 10-position context
    tok = SimpleNamespace(chat_template=None, bos_token_id=None, encode=lambda text, **kw: text.split())
    seen = []
    monkeypatch.setattr(evaluate, "answer", lambda model, tok, rows, **kw: seen.extend(rows) or
                        [evaluate.Generation("x", False, 4) for _ in rows])
    result = evaluate.evaluate_prompts(model, tok, EvalSection(prompts=str(path), max_new_tokens=4, show=0), tmp_path)
    assert [r["prompt"] for r in seen] == ["one two three", "four five"]
    assert result.metrics["eval_prompts"] == 2 and result.metrics["eval_prompts_skipped_long"] == 1
    with pytest.raises(UserError, match="no prompt leaves eval.max_new_tokens=9 positions free"):
        evaluate.evaluate_prompts(model, tok, EvalSection(prompts=str(path), max_new_tokens=9, show=0), tmp_path)


def test_answers_that_retokenise_past_the_context_are_scored_up_to_its_end():
    # The world base has 128 positions; text decoded from a generation can re-tokenise longer than it
    # was generated (DPO's KL estimate scores sampled answers from their text).
    from types import SimpleNamespace

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    tok = SimpleNamespace(chat_template=None, bos_token_id=None, eos_token_id=15, pad_token_id=14,
                          get_vocab=lambda: {}, encode=lambda text, **kw: [int(c) for c in text.split()])
    full = evaluate.sequence_logprobs(model, tok, ["1 2 3"], ["4 5 6 7 8 9 10"], ["15"])  # 3 + 8 > 8 positions
    cut = evaluate.sequence_logprobs(model, tok, ["1 2 3"], ["4 5 6 7 8"], [None])  # what fits: 3 + 5
    assert full == pytest.approx(cut)
    # batched by length, returned in the order asked
    both = evaluate.sequence_logprobs(model, tok, ["1 2 3", "1"], ["4 5 6 7 8", "2"], [None, "15"])
    alone = evaluate.sequence_logprobs(model, tok, ["1"], ["2"], ["15"])
    assert both == pytest.approx(cut + alone, abs=1e-5)
