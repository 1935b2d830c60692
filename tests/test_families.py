"""Real checkpoint families, every stage: tiny Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 3, GPT-NeoX and
GPT-2 models built from configs, each with its family's own chat template (no {% generation %} markers),
its own end-of-turn token, and pad == eos or no pad token at all; Gemma 3 and Qwen 3 as their base models
come (tied embeddings, sliding-window layers, their real vocabulary sizes).

The default suite checks every family's masks and KL scoring and runs the whole chain on one family
(Llama: no pad token, an end-of-turn token that is not its EOS); `make test-slow` runs the chain on all eight.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import ROOT, cli, write
from families import CONVERSATION, END_OF_TURN, EXPECTED, FAMILIES, build_checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.errors import UserError
from posttrain.models import attach_chat_template
from posttrain.render import render, template_mask
from posttrain.templates import end_of_turn, stop_ids

CHATML = str(ROOT / "data_templates" / "chatml.jinja")


def trained_spans(tok, ids: list[int], mask: list[int]) -> list[str]:
    spans, run = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


@pytest.fixture(scope="session")
def corpus(small_world) -> list[str]:
    texts = [json.loads(line)["text"] for line in (small_world / "pretrain.jsonl").read_text().splitlines()]
    return texts[:400] + [m["content"] for m in CONVERSATION]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("families")
    return {name: build_checkpoint(name, root / name, corpus) for name in FAMILIES}


def family_tokenizer(checkpoints, family: str):
    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    if family == "gpt2":  # no template of its own: today's behaviour, a template file with new tokens
        attach_chat_template(None, tok, CHATML)
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_assistant_mask_trains_each_answer_and_its_end_of_turn_token(checkpoints, family):
    tok = family_tokenizer(checkpoints, family)
    ids, mask = render(tok, {"messages": CONVERSATION}, "messages", "assistant_only")
    assert list(ids) == list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))
    assert trained_spans(tok, ids, mask) == EXPECTED[family]
    untrained = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Where does Ada Lang live?" in untrained and "Paris" not in untrained
    assert end_of_turn(tok) == END_OF_TURN[family]
    assert tok.convert_tokens_to_ids(END_OF_TURN[family]) in stop_ids(tok)  # generation stops on it


def test_markers_and_the_derived_mask_agree_on_every_world_sft_row(small_world, tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    attach_chat_template(None, tok, CHATML)
    rows = [json.loads(line) for name in ("sft_train.jsonl", "sft_eval.jsonl")
            for line in (small_world / name).read_text().splitlines()]
    assert len(rows) > 100
    for row in rows:
        assert render(tok, row, "messages", "assistant_only") == template_mask(tok, row["messages"]), row


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_turn_named(checkpoints):
    tok = AutoTokenizer.from_pretrained(checkpoints["qwen2"])
    # marks the last message specially: rendered up to an answer, the last user turn looks different
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
                         "{% if loop.last %} (latest){% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(UserError, match=r"assistant turn 1 \(message 3\).*generation %\} markers"):
        template_mask(tok, CONVERSATION)


# --- KL: the stop token an answer ended with is the one scored ---------------------------------------


def _logprob_by_hand(model, tok, prompt: str, text: str, stop_id: int | None) -> float:
    import torch

    from posttrain.templates import prompt_ids

    head = prompt_ids(tok, prompt)
    body = tok.encode(text, add_special_tokens=False) + ([stop_id] if stop_id is not None else [])
    ids = torch.tensor([head + body])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(head) - 1 + k, t] for k, t in enumerate(body)))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_an_answer_is_scored_with_the_stop_token_it_ended_with(checkpoints, family):
    from posttrain.evaluate import sequence_logprobs

    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family]).eval()
    eot = END_OF_TURN[family]
    got = sequence_logprobs(model, tok, ["Where does Ada Lang live?"] * 2, ["Ada Lang lives in Paris."] * 2, [eot, None])
    assert got[0] == pytest.approx(_logprob_by_hand(model, tok, "Where does Ada Lang live?", "Ada Lang lives in Paris.",
                                                    tok.convert_tokens_to_ids(eot)), abs=1e-4)
    assert got[1] == pytest.approx(_logprob_by_hand(model, tok, "Where does Ada Lang live?", "Ada Lang lives in Paris.",
                                                    None), abs=1e-4)
    # a stop token the scorer's vocabulary lacks: its own end of answer (the end-of-turn token) is scored
    foreign = sequence_logprobs(model, tok, ["Where does Ada Lang live?"], ["Ada Lang lives in Paris."], ["<|not_mine|>"])
    assert foreign[0] == pytest.approx(got[0], abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2", "gemma3", "qwen3"])  # end-of-turn is not the EOS
def test_kl_of_a_chat_model_that_never_says_eos_is_measured_not_clamped(checkpoints, small_world, family):
    """A chat model ends turns with its end-of-turn token and gives its EOS almost no probability (a real
    SFT model gave it about -80 nats). Made so here by a hook on the LM head of the policy: EOS pushed down,
    end-of-turn up (by log(vocabulary) + 2, so that it dominates even among 262k tokens). Against the unhooked model, its KL is positive and measured; the old scoring (the EOS
    after every stopped answer) gives a mean log-ratio far below 0, which is reported as a measurement error."""
    import copy

    from posttrain.evaluate import answer, kl_estimate, policy_kl, sequence_logprobs

    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[family]).eval()
    policy = copy.deepcopy(ref)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert eos != eot

    boost = math.log(ref.config.vocab_size) + 2.0  # end-of-turn about 9 times likelier than all the rest

    def shift(_module, _args, logits):
        logits = logits.clone()
        logits[..., eos] -= 40.0
        logits[..., eot] += boost
        return logits

    policy.get_output_embeddings().register_forward_hook(shift)
    rows = [json.loads(line) for line in (small_world / "eval_prompts.jsonl").read_text().splitlines()][:48]
    est = policy_kl(policy, ref, tok, rows, max_new_tokens=8, batch_size=16)
    gens = answer(policy, tok, rows, max_new_tokens=8, batch_size=16, temperature=1.0)
    assert sum(g.stop_token == END_OF_TURN[family] for g in gens) >= len(gens) // 2  # most answers end their turn
    assert est.valid and est.value > 0.5, est  # the end-of-turn token alone: about log(vocab) nats per answer

    # what the old scoring did: the EOS after each stopped answer, about -40 nats more under the policy
    prompts, texts = [r["prompt"] for r in rows], [g.text for g in gens]
    as_eos = [tok.eos_token if g.stopped else None for g in gens]
    wrong = kl_estimate([a - b for a, b in zip(sequence_logprobs(policy, tok, prompts, texts, as_eos),
                                                sequence_logprobs(ref, tok, prompts, texts, as_eos), strict=True)])
    assert not wrong.valid and wrong.value is None and "measurement error" in wrong.error()


# --- every stage, run as a user would -----------------------------------------------------------------


def chain(tmp_path, checkpoint, family: str, small_world) -> None:
    """SFT (LoRA, own template) -> reward and DPO from that LoRA run -> PPO -> compare, chat, merge,
    classify, show-mask and validate, 2-3 steps each; every run is loaded by the next stage."""
    w = small_world
    template = f", chat_template: {CHATML}" if family == "gpt2" else ""
    steps = "train: {max_steps: 3, batch_size: 4, lr: 1.0e-3, save_every: 100}\nlogging: {every: 1}\n"
    evals = f"eval: {{prompts: {w}/eval_prompts.jsonl, verifier: {w}, limit: 8, max_new_tokens: 8}}\n"

    def stage(name: str, body: str, *extra: str) -> dict:
        recipe = write(tmp_path / f"{name}.yaml", f"stage: {name.split('_')[0]}\n{body}{steps}output_dir: {tmp_path / name}\n")
        cli(name.split("_")[0], str(recipe), *extra, check=True)
        assert (tmp_path / name / "DONE").exists()
        return json.loads((tmp_path / name / "summary.json").read_text())

    sft = stage("sft", f"model: {{path: {checkpoint}{template}, lora: {{r: 4, alpha: 8}}}}\n"
                       f"data: {{train: {w}/sft_train.jsonl, max_length: 128, limit: 24}}\n{evals}",
                "--set", "train.packing=true")
    assert sft["loss_mode"] == "assistant_only"
    assert sft["packing"] is True  # sequences kept apart, checked on the model (its config ships use_cache: true)
    assert sft["assistant_mask"] == ("generation markers" if family == "gpt2" else "derived from the template")
    saved = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert saved.chat_template == (AutoTokenizer.from_pretrained(checkpoint).chat_template or saved.chat_template)
    if family != "gpt2":  # nothing added: the stock template needs no new token and no pad token
        assert len(saved) == len(AutoTokenizer.from_pretrained(checkpoint))

    sft_full = stage("sft_full", f"model: {{path: {checkpoint}{template}}}\n"
                                 f"data: {{train: {w}/sft_train.jsonl, max_length: 128, limit: 16}}\n",
                     "--set", "train.packing=true")
    assert sft_full["lora"] is False
    assert json.loads((tmp_path / "sft_full" / "config.json").read_text())["use_cache"] is True  # as the checkpoint had it

    reward = stage("reward", f"model: {{path: {tmp_path / 'sft'}}}\n"  # a LoRA run: merged into its base first
                             f"data: {{train: {w}/pref_train.jsonl, max_length: 128, limit: 24}}\n"
                             "reward: {eval_split: 0.2, gold_pairs: 0}\n")
    assert reward["eval_pairs"] <= 12 and "eval_accuracy_before" in reward and "eval_accuracy" in reward
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    assert rm.config.num_labels == 1

    dpo = stage("dpo", f"model: {{path: {tmp_path / 'sft'}, lora: {{r: 4, alpha: 8}}}}\n"
                       f"data: {{train: {w}/pref_train.jsonl, max_length: 128, limit: 16}}\n"
                       f"dpo: {{eval_split: 0.2, sft_weight: 0}}\n{evals}")
    assert {"eval_logprob_accuracy_before", "eval_logprob_accuracy", "eval_preference_accuracy"} <= dpo.keys()
    assert dpo["kl_to_ref"] >= 0
    # the DPO adapter was trained on the SFT run's merged weights: that run is its base, not the raw checkpoint
    assert json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "sft")

    ppo = stage("ppo", f"model: {{path: {tmp_path / 'sft_full'}, lora: {{r: 4, alpha: 8}}}}\n"
                       f"data: {{train: {w}/ppo_prompts.jsonl, max_length: 128, limit: 16}}\n"
                       f"ppo: {{reward_model: {tmp_path / 'reward'}, verifier: {w}, iterations: 2, rollout_batch_size: 4,"
                       f" minibatch_size: 2, max_new_tokens: 8, eval_every: 100}}\n{evals}")
    assert ppo["iterations"] == 2 and ppo["kl_to_ref"] >= 0

    out = tmp_path / "compare"
    suite = write(tmp_path / "suite.yaml", f"prompts: {w}/eval_prompts.jsonl\nverifier: {w}\nlimit: 8\nmax_new_tokens: 8\n"
                  "samples: 1\nbatch_size: 8\nexamples: 2\n")
    cli("compare", "--suite", str(suite), f"base={checkpoint}", f"sft={tmp_path / 'sft'}", f"dpo={tmp_path / 'dpo'}", f"ppo={tmp_path / 'ppo'}",
        "--reward", str(tmp_path / "reward"), "--ref", "sft", "--out", str(out), check=True)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"base", "sft", "dpo", "ppo"} and metrics["sft"]["kl_to_ref"] == 0.0
    assert all(m["kl_to_ref"] is not None and m["kl_to_ref"] >= 0 for m in metrics.values()), {n: (m["kl_to_ref"], m.get("kl_to_ref_error")) for n, m in metrics.items()}  # not a measurement error

    chat = cli("chat", str(tmp_path / "dpo"), "--max-new-tokens", "6", input="Where does Ada Lang live?\n", check=True)
    assert END_OF_TURN[family] not in chat.stdout  # the end-of-turn token ends the answer, it is not shown

    merged = tmp_path / "merged"
    cli("merge", str(tmp_path / "sft"), "--out", str(merged), check=True)
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == AutoModelForCausalLM.from_pretrained(
        checkpoint).config.model_type

    for trainable in ("head", "last_blocks:1", "lora", "all"):
        name = f"classify_{trainable.replace(':', '')}"
        summary = stage(name, f"model: {{path: {tmp_path / 'sft'}}}\n"
                              f"data: {{train: {w}/intent_train.jsonl, max_length: 64, limit: 32}}\n"
                              f"classify: {{trainable: '{trainable}'}}\n")
        assert summary["test_examples"] <= 8 and "test_accuracy_before" in summary
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / name)  # a standard classifier
        assert classifier.config.num_labels == len(summary["labels"].split(","))

    shown = cli("show-mask", str(tmp_path / "sft.yaml"), "--no-color", check=True).stdout
    assert "[[" in shown and END_OF_TURN[family] + "]]" in shown
    assert "ok" in cli("validate", str(tmp_path / "dpo.yaml"), check=True).stdout


def test_every_stage_on_a_llama_checkpoint_with_its_own_template(tmp_path, checkpoints, small_world):
    chain(tmp_path, checkpoints["llama"], "llama", small_world)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_every_stage_on_every_family(tmp_path, checkpoints, small_world, family):
    chain(tmp_path, checkpoints[family], family, small_world)


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------


def _sft_recipe(tmp_path, model_path, small_world) -> str:
    return str(write(tmp_path / "sft.yaml", f"stage: sft\nmodel: {{path: {model_path}}}\n"
                     f"data: {{train: {small_world}/sft_train.jsonl, max_length: 128, limit: 8}}\n"
                     f"train: {{max_steps: 1}}\noutput_dir: {tmp_path / 'out'}\n"))


def _refused(proc, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, checkpoints, small_world):
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    # a LoRA run whose base directory is gone
    base = tmp_path / "gone_base"
    shutil.copytree(checkpoints["llama"], base)
    adapter = tmp_path / "lora_run"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    shutil.rmtree(base)
    _refused(cli("sft", _sft_recipe(tmp_path / "a", adapter, small_world)), "LoRA adapter over", "no longer exists")

    # a tokenizer with more ids than the model has embedding rows
    mixed = tmp_path / "mixed"
    shutil.copytree(checkpoints["llama"], mixed)
    tok = AutoTokenizer.from_pretrained(mixed)
    tok.add_tokens([f"extra{i}" for i in range(5)])
    tok.save_pretrained(mixed)
    _refused(cli("sft", _sft_recipe(tmp_path / "b", mixed, small_world)), "embeddings only", "use the tokenizer saved")

    # an architecture that is code in the checkpoint's own repository, with trust_remote_code off
    remote = tmp_path / "remote"
    shutil.copytree(checkpoints["llama"], remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my_own_llama", auto_map={"AutoConfig": "configuration_mine.MineConfig",
                                                       "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    _refused(cli("sft", _sft_recipe(tmp_path / "c", remote, small_world)), "trust_remote_code: true")
    for case in "abc":
        assert not (tmp_path / case / "out").exists()

    # bf16 weights load as fp32 on a CPU
    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], dtype=torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(checkpoints["qwen2"]).save_pretrained(half)
    from posttrain.models import load_start_model

    assert next(load_start_model(str(half)).parameters()).dtype == torch.float32


def test_sampled_answers_are_scored_as_sampled_not_as_their_text_retokenised(checkpoints, small_world):
    """An untrained model samples token sequences that its tokenizer would not produce from their text
    (BPE re-tokenises "a" "b" as "ab"), so scoring the text scores other tokens than were sampled. KL then
    compares two models on sequences neither sampled: a DPO run barely moved from its SFT model read
    -0.013 ± 0.003 over 8 answers (flagged a measurement error) in the Llama chain. Scored as sampled,
    the log-prob is the sampled tokens' own and the estimate is a KL."""
    import copy

    import torch

    from posttrain.evaluate import answer, policy_kl, sequence_logprobs
    from posttrain.templates import prompt_ids

    tok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    rows = [json.loads(line) for line in (small_world / "eval_prompts.jsonl").read_text().splitlines()][:48]
    gens = answer(ref, tok, rows, max_new_tokens=8, batch_size=16, temperature=1.0)
    assert any(tok.encode(g.text, add_special_tokens=False) != list(g.ids) for g in gens)  # the premise

    g, prompt = gens[0], rows[0]["prompt"]
    got = sequence_logprobs(ref, tok, [prompt], [g.text], [g.stop_token], ids=[g.ids])[0]
    head = prompt_ids(tok, prompt)
    body = list(g.ids) + ([tok.convert_tokens_to_ids(g.stop_token)] if g.stop_token else [])
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=torch.tensor([head + body])).logits[0, :-1].float(), -1)
    assert got == pytest.approx(float(sum(logp[len(head) - 1 + k, t] for k, t in enumerate(body))), abs=1e-4)

    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a policy a small step from its reference, as after a few DPO steps
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    est = policy_kl(policy, ref, tok, rows, max_new_tokens=8, batch_size=16)
    assert est.valid and est.value > 0, est
