"""Reward modelling: last-real-token scoring, counted skips, and a loadable sequence classifier."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, write
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.errors import UserError
from posttrain.models import add_blocks
from posttrain.preference import RewardScorer, encode, fit_length, load_pairs


def test_score_is_read_at_the_last_real_token_whatever_the_padding(tiny_reward):
    scorer = RewardScorer.load(tiny_reward)
    short = scorer.ids("What is 3 plus 4?", "3 plus 4 is 7.")
    long = scorer.ids("Where does someone live with a very long question here?", "A rather long answer " * 4)
    alone = scorer.score_ids([short])[0]
    padded_right = scorer.score_ids([short, long])[0]  # right-padded to the longer sequence
    assert abs(alone - padded_right) < 1e-5
    # batched by length, returned in the order asked
    both = scorer.score_ids([long, short])
    assert abs(both[1] - alone) < 1e-5 and abs(both[0] - scorer.score_ids([long])[0]) < 1e-5
    # left padding too (with positions that skip the padding, as GPT-2's absolute positions need): the
    # pooled position is the rightmost non-pad token either way
    pad = scorer.tok.pad_token_id
    ids = torch.tensor([[pad] * 7 + short])
    mask = (ids != pad).long()
    left = scorer.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[0, 0].item()
    assert abs(alone - left) < 1e-4


def test_reward_run_reports_and_loads_as_a_classifier(tiny_reward, tiny_sft):
    summary = json.loads((tiny_reward / "summary.json").read_text())
    for key in ("eval_accuracy", "eval_mean_margin", "gold_agreement", "gold_pairs_sampled", "train_pairs"):
        assert key in summary, key
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert (tiny_reward / "plots" / "score_histogram.png").exists()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward)
    tok = AutoTokenizer.from_pretrained(tiny_reward)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    # the fixture adds a block on top of the SFT model's (reward.extra_layers: 1); it is saved and loads back
    assert model.config.n_layer == AutoModelForSequenceClassification.from_pretrained(tiny_sft).config.n_layer + 1


def test_degenerate_pairs_are_counted_and_skipped(tmp_path):
    rows = [{"prompt": "Q1", "chosen": "A", "rejected": "B"}, {"prompt": "Q2", "chosen": "same", "rejected": "same"}]
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pairs, counts = load_pairs(str(path))
    assert counts == {"pairs": 1, "degenerate_skipped": 1} and pairs[0]["prompt"] == "Q1"


def test_overlong_pairs_are_truncated_or_dropped_and_each_case_counted(tiny_sft):
    tok = AutoTokenizer.from_pretrained(tiny_sft)
    short = {"prompt": "Where does Ada live? ", "chosen": "Paris.", "rejected": "Rome."}
    long_answers = {"prompt": "Where does Ada live? ", "chosen": "Paris " * 30, "rejected": "Rome " * 30}
    tied_once_cut = {"prompt": "Where does Ada live? ", "chosen": "Paris " * 30 + "yes", "rejected": "Paris " * 30 + "no"}
    long_prompt = {"prompt": "Where does Ada live? " * 20, "chosen": "Paris.", "rejected": "Rome."}
    pairs = [short, long_answers, tied_once_cut, long_prompt]
    n = 24
    assert len(encode(tok, short)[0]) + len(encode(tok, short)[1]) <= n < len(encode(tok, long_prompt)[0])

    kept, counts = fit_length(tok, pairs, n, "truncate", "train")
    assert counts == {"train_pairs": 2, "train_dropped_overlong": 1, "train_truncated_overlong": 1,
                      "train_tied_after_truncation": 1}
    assert [k[3] for k in kept] == [0, 1] and all(len(p) + max(len(c), len(r)) <= n for p, c, r, _ in kept)
    assert kept[0][1:3] == encode(tok, short)[1:]  # a pair that fits is left alone

    kept, counts = fit_length(tok, pairs, n, "drop", "eval")
    assert counts == {"eval_pairs": 1, "eval_dropped_overlong": 3} and kept[0][3] == 0
    with pytest.raises(UserError, match="no pair left"):
        fit_length(tok, [long_prompt], n, "truncate", "train")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "A"}, "missing 'rejected'"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}, "mix strings and message lists"),
    ({"prompt": [{"role": "user", "content": "Q"}],
      "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "assistant", "content": "B"}]}, "prompt would appear twice"),
])
def test_bad_pairs(tmp_path, row, message):
    path = write(tmp_path / "p.jsonl", json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        load_pairs(str(path))


def test_alpaca_preference_records(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Red.", "chosen": "Red.", "rejected": "Rd"}]
    path = write(tmp_path / "p.json", json.dumps(rows))
    pairs, _ = load_pairs(str(path))
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Red."}]


def test_reward_refuses_an_unfinished_run(tmp_path, small_world, tiny_sft):
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("stage: sft\n")
    recipe = write(tmp_path / "r.yaml", f"""\
stage: reward
model: {{path: {unfinished}}}
data: {{train: {small_world}/pref_train.jsonl, max_length: 128}}
output_dir: {tmp_path / 'out'}
""")
    proc = cli("reward", str(recipe))
    assert proc.returncode == 2 and "unfinished run (no DONE file)" in proc.stderr


def test_added_blocks_start_as_the_identity(tiny_sft):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_sft, num_labels=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    before = model(input_ids=ids).logits
    layers = model.config.n_layer
    add_blocks(model, 2)
    assert model.config.n_layer == layers + 2 == len(model.transformer.h)
    assert torch.allclose(model.eval()(input_ids=ids).logits, before, atol=1e-6)
    # and they train: the zero output projections get gradients
    model(input_ids=ids).logits.sum().backward()
    assert model.transformer.h[-1].mlp.c_proj.weight.grad.abs().sum() > 0


def test_added_blocks_need_a_gpt2_model():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, vocab_size=32, num_labels=1))
    add_blocks(model, 0)  # the default leaves any model alone
    with pytest.raises(UserError, match="reward.extra_layers"):
        add_blocks(model, 1)
