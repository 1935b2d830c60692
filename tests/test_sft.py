"""SFT: the loss mask, packing without cross-contamination, LoRA + merge, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, cli, write
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models import attach_chat_template, load_causal_lm
from posttrain.render import render
from posttrain.stages.sft import PackedRows, packing_is_exact
from posttrain.templates import prompt_ids, stop_ids

CHATML = str(ROOT / "data_templates" / "chatml.jinja")
ALPACA = str(ROOT / "data_templates" / "alpaca.jinja")


@pytest.fixture()
def chat_tok(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    added = attach_chat_template(model, tok, CHATML)
    return tok, model, added


def test_multi_turn_mask_trains_exactly_the_assistant_turns_and_their_end_tokens(chat_tok):
    tok, _, _ = chat_tok
    chat = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where does Ada Lang live?"},
        {"role": "assistant", "content": "Ada Lang lives in Paris."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 is 7."},
    ]
    ids, mask = render(tok, {"messages": chat}, "messages", "assistant_only")
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    masked = [t for t, m in zip(ids, mask, strict=True) if not m]
    assert tok.decode(trained) == "Ada Lang lives in Paris.<|im_end|>3 plus 4 is 7.<|im_end|>"
    assert tok.decode(masked).count("<|im_end|>") == 3  # the system and both user turns end untrained
    assert "helpful" in tok.decode(masked) and "Where does" in tok.decode(masked)
    # the trained tokens are contiguous spans, one per assistant turn
    starts = sum(1 for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1]))
    assert starts == 2


def test_template_adds_tokens_resizes_and_separates_pad_from_eos(chat_tok, tiny_base):
    tok, model, added = chat_tok
    base_vocab = len(AutoTokenizer.from_pretrained(tiny_base))
    assert len(added) == 2 and len(tok) == base_vocab + 2
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in stop_ids(tok)
    assert tok.decode(prompt_ids(tok, "Hi")).endswith("<|im_start|>assistant\n")


def test_completion_only_and_alpaca_masks(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids, mask = render(tok, {"prompt": "Ada Lang lives in", "completion": " Paris."}, "prompt_completion", "completion_only")
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == " Paris.<|endoftext|>"
    attach_chat_template(None, tok, ALPACA)
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    ids, mask = render(tok, {"messages": chat}, "messages", "assistant_only")
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "Red.<|endoftext|>"
    assert "### Instruction:\nName a colour." in tok.decode(ids)


def test_packed_sequences_do_not_see_each_other(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert packing_is_exact(model)


def test_packed_rows_give_the_loss_of_trls_single_row_and_of_each_sequence_alone(tiny_base):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 9, 4, 7, 6)]
    features = [{"input_ids": seqs[0] + seqs[1], "seq_lengths": [5, 9]},  # rows of unequal length: padding
                {"input_ids": seqs[2] + seqs[3] + seqs[4], "seq_lengths": [4, 7, 6]}]
    for f in features:
        f["labels"] = list(f["input_ids"])
    pad = 0
    rows = PackedRows(pad)(features)
    assert rows["input_ids"].shape == (2, 17) and rows["position_ids"][0].tolist()[14:] == [0, 1, 2]
    flat = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(features)
    extra = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
    with torch.no_grad():
        a = model(**rows).loss
        b = model(**{k: v for k, v in flat.items() if k not in extra}).loss
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0, :-1].log_softmax(-1)
                           .gather(-1, torch.tensor(s[1:])[:, None])[:, 0] for s in seqs])
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    assert a.item() == pytest.approx(-alone.mean().item(), abs=1e-5)


def _sft_recipe(tmp_path, small_world, tiny_base, name: str, extra: str = "") -> str:
    return str(write(tmp_path / f"{name}.yaml", f"""\
stage: sft
model: {{path: {tiny_base}, chat_template: {CHATML}{extra}}}
data: {{train: {small_world}/sft_train.jsonl, eval: {small_world}/sft_eval.jsonl, max_length: 128}}
train: {{max_steps: 12, lr: 1.0e-3, batch_size: 8, packing: true, save_every: 100}}
eval: {{prompts: {small_world}/eval_prompts.jsonl, verifier: {small_world}, probe: {small_world}/probe.jsonl, limit: 40, max_new_tokens: 16}}
logging: {{every: 2}}
output_dir: {tmp_path / name}
"""))


def test_sft_end_to_end_reports_format_and_heldout_retention(tmp_path, small_world, tiny_base):
    proc = cli("sft", _sft_recipe(tmp_path, small_world, tiny_base, "sft"), check=True)
    out = tmp_path / "sft"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_loss", "format_rate", "stop_rate", "gold_score", "padding_fraction", "heldout_retention",
                "base_heldout_recall", "train_examples", "trained_token_fraction"):
        assert key in summary, key
    assert summary["packing"] is True and summary["padding_fraction"] < 0.2  # rows of up to 128, padded to the longest
    assert 0 < summary["trained_token_fraction"] < 0.6  # only assistant turns
    assert (out / "eval_answers.jsonl").exists() and (out / "DONE").exists()
    assert "sft summary" in proc.stdout
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(tok)


def test_lora_adapter_merges_to_the_same_greedy_outputs(tmp_path, small_world, tiny_base):
    recipe = _sft_recipe(tmp_path, small_world, tiny_base, "lora", ", lora: {r: 8, alpha: 16, dropout: 0.0}")
    cli("sft", recipe, "--set", "sft.merge=true", "--set", "train.lr=5.0e-3", check=True)
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and (out / "merged" / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"] is True and summary["trainable_params"] < 100_000
    tok = AutoTokenizer.from_pretrained(out)
    adapter = load_causal_lm(str(out), tokenizer=tok).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([prompt_ids(tok, q) for q in ["What is 3 plus 4?", "What is 5 plus 1?"]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(adapter.generate(ids, **kw), merged.generate(ids, **kw))
    # the new chat tokens were trained (not frozen at their initial rows)
    base_rows = AutoModelForCausalLM.from_pretrained(tiny_base).get_input_embeddings().weight
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert merged.get_input_embeddings().weight.shape[0] == base_rows.shape[0] + 2
    proc = cli("merge", str(out), "--out", str(tmp_path / "merged2"), check=True)
    assert "merged model written" in proc.stdout and im_end > 0


def test_show_mask_prints_brackets_and_counts(tmp_path, small_world, tiny_base):
    proc = cli("show-mask", _sft_recipe(tmp_path, small_world, tiny_base, "sm"), "--index", "2", check=True)
    assert "[[" in proc.stdout and "<|im_end|>]]" in proc.stdout
    assert "trained" in proc.stdout and "masked" in proc.stdout


@pytest.mark.parametrize("case", ["no_assistant", "unknown_role", "unmaskable", "all_too_long", "context"])
def test_bad_sft_input_is_one_line_exit_2(tmp_path, small_world, tiny_base, case):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rows, template, extra = [{"messages": good}] * 3, CHATML, "\n  max_length: 128"
    if case == "no_assistant":
        rows = [{"messages": good}, {"messages": good[:1]}]
    elif case == "unknown_role":
        rows = [{"messages": good + [{"role": "robot", "content": "beep"}]}]
    elif case == "unmaskable":  # no markers, and the last message is rendered differently from the others
        template = str(write(tmp_path / "plain.jinja", "{#- stop: <|im_end|> -#}{% for m in messages %}{{ '<|im_start|>' + "
                             "m['role'] + '\\n' + m['content'] }}{% if loop.last %} (latest){% endif %}{{ '<|im_end|>\\n' }}"
                             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))
    elif case == "all_too_long":
        rows = [{"messages": [good[0], {"role": "assistant", "content": "word " * 200}]}] * 2
    elif case == "context":
        extra = "\n  max_length: 4096"
    data = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    recipe = write(tmp_path / "r.yaml", f"""\
stage: sft
model: {{path: {tiny_base}, chat_template: {template}}}
data:
  train: {data}{extra}
output_dir: {tmp_path / 'out'}
""")
    proc = cli("sft", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    expected = {"no_assistant": "d.jsonl:2: chat has no assistant turn", "unknown_role": "unknown role 'robot'",
                "unmaskable": "the answer cannot be located", "all_too_long": "no example left to train on",
                "context": "longer than the model's context"}[case]
    assert expected in proc.stderr
    assert not (tmp_path / "out" / "DONE").exists()
