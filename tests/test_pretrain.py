"""The pretrain stage: a real (tiny) GPT-2 trained from scratch, saved as a standard HF directory."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import cli, write
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_loss_falls_and_the_saved_model_reloads_and_generates(tiny_base):
    assert (tiny_base / "DONE").exists() and (tiny_base / "model.safetensors").exists()
    losses = [r["loss"] for r in map(json.loads, (tiny_base / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 2.0
    summary = json.loads((tiny_base / "summary.json").read_text())
    assert 0.0 <= summary["fact_recall"] <= 1.0 and "fact_recall_heldout" in summary
    assert (tiny_base / "plots" / "loss.png").stat().st_size > 1000
    assert (tiny_base / "tensorboard").is_dir() and "fact_recall" in (tiny_base / "README.md").read_text()

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert tok.pad_token_id != tok.eos_token_id  # padding can never hide a trained end token
    ids = tok("Ada", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert torch.isfinite(model(ids).logits).all()


def test_same_recipe_and_seed_give_the_same_loss(tiny_base, tmp_path):
    recipe = (tiny_base.parent / "base.yaml").read_text().replace(str(tiny_base), str(tmp_path / "again"))
    cli("pretrain", str(write(tmp_path / "again.yaml", recipe)), check=True)
    a = json.loads((tiny_base / "summary.json").read_text())
    b = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert a["final_loss"] == b["final_loss"] and a["fact_recall"] == b["fact_recall"]


def test_rerun_is_skipped_and_a_changed_recipe_is_refused(tiny_base):
    recipe = tiny_base.parent / "base.yaml"
    proc = cli("pretrain", str(recipe))
    assert proc.returncode == 0 and "already done" in proc.stdout
    proc = cli("pretrain", str(recipe), "--set", "train.lr=1e-3")
    assert proc.returncode == 2 and "different recipe" in proc.stderr and "--force" in proc.stderr
    # The same settings in another key order (as a newer release may write them) are the same recipe.
    saved = tiny_base / "recipe.yaml"
    original = saved.read_text()
    try:
        saved.write_text(yaml.safe_dump(dict(reversed(yaml.safe_load(original).items())), sort_keys=False))
        assert saved.read_text() != original
        proc = cli("pretrain", str(recipe))
        assert proc.returncode == 0 and "already done" in proc.stdout
    finally:
        saved.write_text(original)


def test_bad_data_fails_cleanly_without_an_output_dir(tmp_path):
    write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"txt": "oops"}\n')
    recipe = write(tmp_path / "r.yaml", f"""\
stage: pretrain
model: {{config: {{n_layer: 1, n_embd: 32, n_head: 2}}}}
data: {{train: {tmp_path / 'c.jsonl'}, max_length: 16}}
output_dir: {tmp_path / 'out'}
""")
    proc = cli("pretrain", str(recipe))
    assert proc.returncode == 2
    assert "c.jsonl:2: row is missing 'text'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_a_base_of_another_family_built_offline_is_pretrained_then_chats_in_its_own_format(tmp_path, small_world, family):
    """`make family`'s first steps, small: scripts/build_base.py writes a randomly initialised checkpoint
    with the family's traits (tied embeddings, a sliding-window layer, its special tokens and shipped
    template), `posttrain pretrain` continues it on the corpus (model.path), and SFT with the model's
    own template trains its end-of-turn token, which is not its EOS."""
    import subprocess
    import sys

    from conftest import ROOT

    init = tmp_path / "init"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_base.py"), "--family", family, "--corpus",
                    str(small_world / "pretrain.jsonl"), "--out", str(init), "--layers", "2", "--width", "64",
                    "--heads", "2", "--window", "16"], check=True, cwd=ROOT)
    config = json.loads((init / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["sliding_window"] == 16
    assert config["model_type"] == {"gemma3": "gemma3_text", "qwen3": "qwen3"}[family]
    base = tmp_path / "base"
    cli("pretrain", str(write(tmp_path / "base.yaml", f"""\
stage: pretrain
model: {{path: {init}}}
data: {{train: {small_world}/pretrain.jsonl, max_length: 128}}
train: {{max_steps: 30, batch_size: 8, lr: 3.0e-3}}
output_dir: {base}
""")), check=True)
    assert json.loads((base / "config.json").read_text())["model_type"] == config["model_type"]
    sft = tmp_path / "sft"
    cli("sft", str(write(tmp_path / "sft.yaml", f"""\
stage: sft
model: {{path: {base}}}
data: {{train: {small_world}/sft_train.jsonl, max_length: 128, limit: 64}}
train: {{max_steps: 8, batch_size: 8, lr: 1.0e-3}}
output_dir: {sft}
""")), check=True)
    tok = AutoTokenizer.from_pretrained(sft)
    eot = {"gemma3": "<end_of_turn>", "qwen3": "<|im_end|>"}[family]
    stops = json.loads((sft / "generation_config.json").read_text())["eos_token_id"]
    assert tok.eos_token != eot and tok.convert_tokens_to_ids(eot) in (stops if isinstance(stops, list) else [stops])


def test_documents_open_with_the_bos_where_it_is_its_own_token(tiny_base, tmp_path, small_world):
    """Gemma and Llama are pretrained with <bos> before every document, and their templates and the fact
    probes start with it; a GPT-2 tokenizer's BOS is its EOS, which already separates the documents."""
    import subprocess
    import sys

    from conftest import ROOT

    from posttrain.stages.pretrain import documents

    gpt2 = AutoTokenizer.from_pretrained(tiny_base)
    assert documents(gpt2, ["Ada Lang lives in Paris."]) == [gpt2.encode("Ada Lang lives in Paris.") + [gpt2.eos_token_id]]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_base.py"), "--corpus", str(small_world / "pretrain.jsonl"),
                    "--out", str(tmp_path / "gemma"), "--layers", "2", "--width", "32", "--heads", "2"], check=True, cwd=ROOT)
    gemma = AutoTokenizer.from_pretrained(tmp_path / "gemma")
    ids = gemma.encode("Ada Lang lives in Paris.", add_special_tokens=False)
    assert documents(gemma, ["Ada Lang lives in Paris."]) == [[gemma.bos_token_id, *ids, gemma.eos_token_id]]
