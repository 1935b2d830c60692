"""posttrain chat: multi-turn chat through the template, /commands, piped input for scripts."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from posttrain.chat import Chat
from posttrain.evaluate import answer
from posttrain.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def sft_model(tiny_sft):
    tok = load_tokenizer(str(tiny_sft))
    return load_causal_lm(str(tiny_sft), tokenizer=tok), tok


def _person(small_world) -> str:
    return json.loads((small_world / "world.json").read_text())["people"][0]["name"]


def test_piped_chat_prints_one_answer_per_line(tiny_sft, small_world, sft_model):
    name = _person(small_world)
    script = (f"Where does {name} live?\nAnd what pet does {name} have?\n/reset\n/temp 0\n/max 12\n"
              "What is 2 plus 3?\n/quit\nThis line comes after /quit and is never answered.\n")
    proc = cli("chat", str(tiny_sft), input=script)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout
    # After /reset and /temp 0 the answer is the greedy single-turn answer, exactly.
    model, tok = sft_model
    greedy = answer(model, tok, [{"prompt": "What is 2 plus 3?"}], max_new_tokens=12)[0].text
    assert lines[2] == " ".join(greedy.splitlines())
    assert "history cleared" in proc.stderr and "temperature 0 (greedy)" in proc.stderr


def test_history_commands_and_a_full_context(sft_model):
    model, tok = sft_model
    chat = Chat(model, tok, temperature=1.0, max_new_tokens=8, seed=3)
    first = chat.reply("What is 2 plus 3?").text
    chat.reply("And 4 plus 4?")
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.history[1]["content"] == first
    assert chat.command("/reset") == "history cleared" and chat.history == []
    assert chat.command("/temp 0") == "temperature 0 (greedy)" and chat.temperature == 0
    assert chat.command("/temp hot").startswith("usage") and chat.temperature == 0
    assert chat.command("/max 0").startswith("usage") and chat.command("/max 16") == "max new tokens 16"
    assert chat.command("/bogus").startswith("unknown command /bogus")
    assert chat.command("/quit") is None
    # The tiny model's context is 128 tokens: old exchanges are forgotten instead of failing.
    for _ in range(8):
        chat.reply("Please tell me, in one short sentence, where the person you know best lives today?")
    assert chat.dropped > 0 and len(chat.history) >= 2


def test_sampling_is_seeded(sft_model):
    model, tok = sft_model
    runs = [[Chat(model, tok, temperature=1.0, max_new_tokens=10, seed=7).reply(q).text for q in ("Hi.", "Hello?")]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_base_model_continues_plain_text(tiny_base, small_world):
    proc = cli("chat", str(tiny_base), "--max-new-tokens", "8", input=f"{_person(small_world)} lives in\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("no chat template") == 1
    assert len(proc.stdout.splitlines()) == 1


def test_chat_refuses_a_missing_run(tmp_path):
    proc = cli("chat", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_the_default_answer_length_fits_a_short_context(tmp_path, tiny_sft):
    """A model with a 64-token context: the default --max-new-tokens (64) would leave no room for the
    prompt, so the answers are fitted into half the context, said once; an explicit value is still checked."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_sft)
    short = tmp_path / "short"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_embd=16, n_head=2)).save_pretrained(short)
    tok.save_pretrained(short)
    proc = cli("chat", str(short), input="Where does Ada Lang live?\nAnd Bo?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("note: answers of at most 32 tokens") == 1, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 2  # an answer to each line
    bad = cli("chat", str(short), "--max-new-tokens", "64", input="hi\n")
    assert bad.returncode == 2 and "use at most 63" in bad.stderr and "Traceback" not in bad.stderr
