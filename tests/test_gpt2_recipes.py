"""Every recipes/gpt2/*.yaml, run end to end on a CPU in the shape a GPU user runs it.

The Hub is out of reach here, so openai-community/gpt2 becomes a tiny GPT-2 with GPT-2's real
tokenizer (50,257 tokens, same special tokens, no pad) and each Hub dataset a few rows with the same
columns and value types as `datasets.load_dataset(...).to_list()` gives. Everything else is the recipe
as shipped (chat template, loss mode, gradient checkpointing, overlong handling, LoRA-free full
fine-tuning, the run-directory chain sft -> reward -> dpo / ppo); only sizes shrink (two optimizer
steps, small batches, short answers).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED_DATA, cli

from posttrain.inputs import is_hub_id

GPT2_FILES = SHARED_DATA / "gpt2_tokenizer" / "openai_format"
SMS = SHARED_DATA / "sms_spam_collection" / "SMSSpamCollection"
RECIPES = ROOT / "recipes" / "gpt2"
pytestmark = pytest.mark.skipif(not GPT2_FILES.is_dir() or not SMS.is_file(),
                                reason=f"{SHARED_DATA} (GPT-2 tokenizer files, SMS spam) is absent")

# Sizes that make each run a few seconds on one CPU thread; the recipes' own values otherwise.
SMALL = ["model.dtype=float32", "train.max_steps=2", "train.batch_size=2", "train.save_every=1000", "logging.every=1"]
SMALL_EVAL = ["eval.limit=2", "eval.max_new_tokens=8", "eval.batch_size=2"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_stage(stage: str, *overrides: str) -> Path:
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    cli(stage, str(RECIPES / f"{stage}.yaml"), *sets(*overrides), check=True, env={"OMP_NUM_THREADS": "1"})
    run = Path(out)
    assert (run / "DONE").exists()
    return run


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, str]:
    """Local stand-ins for the recipes' Hub names: {hub name[:split]: local path}."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    d = tmp_path_factory.mktemp("gpt2_hub")
    # openai-community/gpt2: GPT-2's tokenizer files (OpenAI's encoder.json + vocab.bpe are Hugging
    # Face's vocab.json + merges.txt) and GPT-2's architecture at toy width; full 1024 positions, so
    # the recipes' data.max_length: 1024 is checked against the same context as the real model.
    files = d / "tokenizer_files"
    files.mkdir()
    shutil.copyfile(GPT2_FILES / "encoder.json", files / "vocab.json")
    shutil.copyfile(GPT2_FILES / "vocab.bpe", files / "merges.txt")
    tok = GPT2Tokenizer.from_pretrained(files)
    assert len(tok) == 50257 and tok.pad_token is None  # as the Hub's gpt2
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=2))
    model.save_pretrained(d / "gpt2")
    tok.save_pretrained(d / "gpt2")

    rng = random.Random(0)
    words = "the a model answer question river city green quickly because small large said think".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    # trl-lib/Capybara: source, messages [{content, role}], num_turns; multi-turn, some past 1024 tokens.
    chats = [[user(text(8)), assistant(text(12)), user(text(6)), assistant(text(10))] for _ in range(5)]
    chats.append([user(text(10)), assistant(text(1200))])  # ~1,200 tokens: truncated (sft.overlong: truncate)
    capybara = [{"source": "stand-in", "messages": c, "num_turns": len(c) // 2} for c in chats]
    # trl-lib/hh-rlhf-helpful-base: prompt = the conversation so far; chosen / rejected one assistant turn.
    hh = [{"prompt": [user(text(8)), assistant(text(8)), user(text(6))], "chosen": [assistant(text(10))],
           "rejected": [assistant(text(4))]} for _ in range(8)]
    # trl-lib/ultrafeedback-prompt: only `prompt`, one user message.
    prompts = [{"prompt": [user(text(8) + "?")]} for _ in range(8)]
    # openai/gsm8k (config main): question, answer ending in "#### N".
    gsm8k = [{"question": text(12) + "?", "answer": f"{text(6)} <<2+{i}={2 + i}>>\n#### {2 + i}"} for i in range(8)]
    # ucirvine/sms_spam: sms, label (a ClassLabel: to_list() gives 0 = ham, 1 = spam); real messages.
    lines = [line.split("\t", 1) for line in SMS.read_text(encoding="utf-8").splitlines()]
    sms = ([{"sms": t, "label": 0} for k, t in lines if k == "ham"][:20]
           + [{"sms": t, "label": 1} for k, t in lines if k == "spam"][:20])
    # stanfordnlp/imdb: text (HTML line breaks included), label; enough tokens for a few 1024-token blocks.
    imdb = [{"text": f"{text(120)}<br /><br />{text(60)}", "label": i % 2} for i in range(12)]
    return {
        "openai-community/gpt2": str(d / "gpt2"),
        "trl-lib/Capybara:train": jsonl(d / "capybara_train.jsonl", capybara),
        "trl-lib/Capybara:test": jsonl(d / "capybara_test.jsonl", capybara[:2]),
        "trl-lib/hh-rlhf-helpful-base:train": jsonl(d / "hh_train.jsonl", hh),
        "trl-lib/hh-rlhf-helpful-base:test": jsonl(d / "hh_test.jsonl", hh[:4]),
        "trl-lib/ultrafeedback-prompt:train": jsonl(d / "uf_train.jsonl", prompts),
        "trl-lib/ultrafeedback-prompt:test": jsonl(d / "uf_test.jsonl", prompts[:4]),
        "ucirvine/sms_spam:train": jsonl(d / "sms.jsonl", sms),
        "openai/gsm8k:main:train": jsonl(d / "gsm8k_train.jsonl", gsm8k),
        "openai/gsm8k:main:test": jsonl(d / "gsm8k_test.jsonl", gsm8k[:4]),
        "stanfordnlp/imdb:train": jsonl(d / "imdb_train.jsonl", imdb),
    }


def swap(stage: str, hub: dict[str, str], runs: dict[str, Path], out: Path) -> list[str]:
    """--set overrides that point every Hub name and runs/gpt2/* path of a recipe at its stand-in."""
    raw = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    overrides = [f"output_dir={out}"]
    for key in ("model.path", "data.train", "data.eval", "eval.prompts", "ppo.reward_model"):
        section, name = key.split(".")
        value = (raw.get(section) or {}).get(name)
        if value is None:
            continue
        if value.startswith("runs/gpt2/"):
            overrides.append(f"{key}={runs[value.removeprefix('runs/gpt2/')]}")
        else:
            assert value in hub, f"{stage}.yaml: {key} {value} has no stand-in"
            overrides.append(f"{key}={hub[value]}")
    return overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished stand-in runs, filled in as the stages run (sft before reward, both before ppo)."""
    return {}


@pytest.fixture(scope="module")
def sft_run(hub, runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt2_runs") / "sft"
    runs["sft"] = run_stage("sft", *swap("sft", hub, runs, out), *SMALL, *SMALL_EVAL)
    return runs["sft"]


@pytest.fixture(scope="module")
def reward_run(hub, runs, sft_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt2_runs") / "reward"
    runs["reward"] = run_stage("reward", *swap("reward", hub, runs, out), *SMALL)
    return runs["reward"]


def test_sft_recipe(sft_run):
    s = summary(sft_run)
    assert s["loss_mode"] == "assistant_only" and s["train_examples"] == 6
    assert s["train_truncated_overlong"] == 1  # the long conversation was cut to 1024 tokens, not dropped
    config = json.loads((sft_run / "config.json").read_text())
    assert config["vocab_size"] == 50257 + 3  # <|im_start|>, <|im_end|>, <|pad|>
    tokenizer_config = (sft_run / "tokenizer_config.json").read_text()
    assert "<|im_end|>" in tokenizer_config and (sft_run / "eval_answers.jsonl").exists()


def test_reward_recipe(reward_run):
    s = summary(reward_run)
    assert s["train_pairs"] == 8 and "eval_accuracy" in s


def test_dpo_recipe(hub, runs, sft_run, tmp_path):
    run = run_stage("dpo", *swap("dpo", hub, runs, tmp_path / "dpo"), *SMALL, *SMALL_EVAL)
    s = summary(run)
    assert s["reference"] == "frozen copy" and s["eval_preference_accuracy"] is not None and "kl_to_ref" in s


def test_ppo_recipe(hub, runs, sft_run, reward_run, tmp_path):
    run = run_stage("ppo", *swap("ppo", hub, runs, tmp_path / "ppo"), "model.dtype=float32", *SMALL_EVAL,
                    "ppo.iterations=2", "ppo.rollout_batch_size=2", "ppo.minibatch_size=1", "ppo.ppo_epochs=1",
                    "ppo.max_new_tokens=8", "train.save_every=1")
    s = summary(run)
    assert s["iterations"] == 2 and "final_proxy" in s and "kl_to_ref" in s


def test_grpo_recipe(hub, runs, sft_run, tmp_path):
    run = run_stage("grpo", *swap("grpo", hub, runs, tmp_path / "grpo"), *SMALL_EVAL, "train.max_steps=2",
                    "train.batch_size=8", "grpo.num_generations=4", "grpo.max_completion_length=8", "train.save_every=1")
    s = summary(run)
    assert s["steps"] == 2 and s["answers_sampled"] == 16 and 0.0 <= s["eval_final_number"] <= 1.0
    assert "final_zero_std_share" in s and "kl_to_ref" in s


def test_classify_recipe(hub, runs, tmp_path):
    run = run_stage("classify", *swap("classify", hub, runs, tmp_path / "classify"), *SMALL)
    s = summary(run)
    assert s["labels"] == "0,1" and s["test_examples"] == 4 and s["val_examples"] == 4


def test_pretrain_recipe(hub, runs, tmp_path):
    run = run_stage("pretrain", *swap("pretrain", hub, runs, tmp_path / "pretrain"), *SMALL)
    s = summary(run)
    assert s["vocab_size"] == 50257 + 1  # GPT-2's tokenizer plus the <|pad|> the stage adds
    assert s["tokens_seen"] == 2 * 2 * 1024


# `posttrain validate --offline` of each recipe as shipped: Hub names are noted, not fetched; the
# runs/gpt2/* inputs of reward, dpo and ppo point at the stand-in runs above (validate checks that
# run directories exist and are finished). Hub datasets are named owner/name:split, which
# inputs.is_hub_id must accept for check_inputs to treat them as Hub names.
SPLITS_ACCEPTED = is_hub_id("trl-lib/Capybara:test")


@pytest.mark.xfail(not SPLITS_ACCEPTED, strict=True,
                   reason="posttrain.inputs.is_hub_id rejects owner/name:split, so validate calls these datasets missing files")
@pytest.mark.parametrize("stage", ["sft", "classify", "reward", "dpo", "ppo", "grpo", "pretrain"])
def test_validate_offline(stage, sft_run, reward_run, runs):
    raw = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    overrides = [f"{key}={runs[value.removeprefix('runs/gpt2/')]}"
                 for key, value in (("model.path", raw["model"]["path"]), ("ppo.reward_model", raw.get("ppo", {}).get("reward_model")))
                 if value and value.startswith("runs/gpt2/")]
    for accel in (None, "single"):
        args = ["validate", "--offline", str(RECIPES / f"{stage}.yaml"), *sets(*overrides)]
        args += ["--accel", str(ROOT / "recipes" / "accelerate" / f"{accel}.yaml")] if accel else []
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "ok (" in proc.stdout and "(not checked offline)" in proc.stdout
