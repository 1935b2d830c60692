"""Bad input, as a careless or hostile user types it. Every case must keep the README's promise: one
line on stderr (two at most) that names the culprit, exit code 2, no traceback, nothing half-written,
and never the last-resort handler (that is for bugs, and a case that reaches it fails here).

The cases run the CLI in this process (`posttrain.cli.main`), so the suite stays fast; the models
they need are tiny ones built once per session (conftest.py). Kinds: recipe files, recipe values,
data files, checkpoints, and each command's own arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, write

from posttrain.cli import main

CHATML = ROOT / "data_templates" / "chatml.jinja"


class Case:
    def __init__(self, kind: str, name: str, build, culprit: str):
        self.kind, self.name, self.build, self.culprit = kind, name, build, culprit

    def __repr__(self) -> str:
        return f"{self.kind}-{self.name}"


CASES: list[Case] = []


def case(kind: str, name: str, culprit: str):
    """Register `build(env) -> argv` as a case whose message must contain `culprit` (formatted with env's
    paths: {tmp}, {world}, {base}, {sft}, {reward})."""
    def register(build):
        CASES.append(Case(kind, name, build, culprit))
        return build
    return register


class Env:
    """What a case builds on: a scratch directory and the session's tiny world and models."""

    def __init__(self, tmp: Path, world: Path, base: Path, sft: Path, reward: Path, lora: Path):
        self.tmp, self.world, self.base, self.sft_dir, self.reward, self.lora = tmp, world, base, sft, reward, lora
        self.out = tmp / "out"  # where a stage would write: it must not appear
        self.stdin: bytes | None = None

    def file(self, name: str, text: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return p

    def recipe(self, text: str, name: str = "r.yaml") -> str:
        return str(self.file(name, text))

    def sft(self, extra: str = "", model: str | None = None, train: str | None = None, name: str = "sft.yaml") -> str:
        """A valid SFT recipe (tiny base + ChatML), with `extra` YAML lines appended."""
        return self.recipe(f"stage: sft\nmodel: {{path: {model or self.base}, chat_template: {CHATML}}}\n"
                           f"data: {{train: {train or self.world / 'sft_train.jsonl'}, max_length: 128, limit: 16}}\n"
                           f"train: {{max_steps: 1, batch_size: 4}}\noutput_dir: {self.out}\n{extra}", name)

    def classify(self, train: str, extra: str = "") -> str:
        return self.recipe(f"stage: classify\nmodel: {{path: {self.base}}}\ndata: {{train: {train}, max_length: 64}}\n"
                           f"train: {{max_steps: 1}}\noutput_dir: {self.out}\n{extra}", "classify.yaml")

    def model_copy(self, name: str = "model") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.base, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "plots"))
        return dst


# --- recipe files ------------------------------------------------------------------------------------

for _name, _content, _culprit in [
    ("binary", b"\x00\x01\x02\xff\xfe binary", "r.yaml"),
    ("utf16", "stage: sft\n".encode("utf-16"), "r.yaml"),
    ("latin1", "stage: sft\noutput_dir: caf\xe9\n".encode("latin-1"), "r.yaml"),
    ("empty", b"", "r.yaml"),
    ("list", b"- stage: sft\n", "r.yaml"),
    ("scalar", b"just words\n", "r.yaml"),
    ("tabs", b"stage: sft\n\tmodel: x\n", "r.yaml:2"),
    ("unclosed", b"stage: sft\nmodel: {path: x\n", "r.yaml"),
    ("python_tag", b"stage: !!python/object/apply:os.system ['echo pwned']\n", "r.yaml"),
    ("custom_tag", b"stage: !include other.yaml\n", "r.yaml"),
    ("unknown_stage", b"stage: grpo_typo\noutput_dir: x\n", "unknown stage"),
    ("no_stage", b"output_dir: x\n", "stage"),
    ("stage_not_string", b"stage: [sft]\noutput_dir: x\n", "stage"),
]:
    case("recipe-file", _name, _culprit)(lambda env, c=_content: ["validate", str(env.file("r.yaml", c))])


@case("recipe-file", "missing", "nope.yaml")
def _(env):
    return ["validate", str(env.tmp / "nope.yaml")]


@case("recipe-file", "directory", "recipe")
def _(env):
    (env.tmp / "adir").mkdir()
    return ["validate", str(env.tmp / "adir")]


@case("recipe-file", "duplicate_key", "output_dir")
def _(env):
    return ["validate", env.sft(f"output_dir: {env.tmp / 'other'}\n")]


@case("recipe-file", "duplicate_section", "train")
def _(env):
    return ["validate", env.sft("train: {lr: 1.0}\n")]


@case("recipe-file", "duplicate_nested_key", "every")
def _(env):
    return ["validate", env.sft("logging: {every: 1, every: 2}\n")]


@case("recipe-file", "alias_bomb", ": e: YAML aliases here expand")  # the key it sits under, named
def _(env):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    return ["validate", env.sft("\n".join(lines) + "\nseed: *i\n")]


@case("recipe-file", "alias_bomb_small", "seed")
def _(env):
    return ["validate", env.sft('x: &x ["lol","lol","lol","lol","lol","lol","lol","lol"]\nseed: [*x, *x, *x]\n')]


@case("recipe-file", "stage_mismatch", "needs stage: dpo")
def _(env):
    return ["dpo", env.sft()]


# --- recipe values -------------------------------------------------------------------------------------

for _name, _extra, _culprit in [
    ("unknown_top_key", "outptu_dir: x\n", "outptu_dir"),
    ("unknown_nested_key", "sft: {los: all}\n", "sft.los"),
    ("lr_string", "train: {lr: fast}\n", "train.lr"),
    ("epochs_inf", "train: {epochs: .inf}\n", "train.epochs"),
    ("epochs_nan", "train: {epochs: .nan}\n", "train.epochs"),
    ("lr_inf", "train: {lr: .inf}\n", "train.lr"),
    ("lr_nan", "train: {lr: .nan}\n", "train.lr"),
    ("lr_negative", "train: {lr: -1}\n", "train.lr"),
    ("lr_zero", "train: {lr: 0}\n", "train.lr"),
    ("batch_zero", "train: {batch_size: 0}\n", "train.batch_size"),
    ("batch_fraction", "train: {batch_size: 2.5}\n", "train.batch_size"),
    ("seed_negative", "seed: -1\n", "seed"),
    ("seed_huge", "seed: 1099511627776\n", "seed"),
    ("seed_float", "seed: 1.5\n", "seed"),
    ("warmup_negative", "train: {warmup: -1}\n", "train.warmup"),
    ("grad_norm_inf", "train: {max_grad_norm: .inf}\n", "train.max_grad_norm"),
    ("beta2_one", "train: {adam_beta2: 1.0}\n", "train.adam_beta2"),
    ("save_every_zero", "train: {save_every: 0}\n", "train.save_every"),
    ("scheduler", "train: {scheduler: exponential}\n", "train.scheduler"),
    ("max_length_zero", "data: {train: x.jsonl, max_length: 0}\n", "data.max_length"),
    ("max_length_huge", "data: {train: x.jsonl, max_length: 100000000000}\n", "data.max_length"),
    ("limit_zero", "data: {train: x.jsonl, limit: 0}\n", "data.limit"),
    ("format", "data: {train: x.jsonl, format: xml}\n", "data.format"),
    ("dtype", "model: {path: x, dtype: float8}\n", "model.dtype"),
    ("loss_mode", "sft: {loss: everything}\n", "sft.loss"),
    ("overlong", "sft: {overlong: wrap}\n", "sft.overlong"),
    ("logging_every_zero", "logging: {every: 0}\n", "logging.every"),
    ("eval_max_new_tokens_zero", "eval: {max_new_tokens: 0}\n", "eval.max_new_tokens"),
    ("lora_r_zero", "model: {path: x, lora: {r: 0}}\n", "model.lora.r"),
    ("lora_dropout", "model: {path: x, lora: {dropout: 1.5}}\n", "model.lora.dropout"),
    ("lora_targets_type", "model: {path: x, lora: {target_modules: 5}}\n", "model.lora.target_modules"),
    ("lora_unknown_key", "model: {path: x, lora: {rank: 8}}\n", "model.lora.rank"),
    ("model_config_in_sft", "model: {path: x, config: {n_layer: 2}}\n", "model.config"),
    ("output_dir_type", "output_dir: [a, b]\n", "output_dir"),
    ("output_dir_empty", "output_dir: ''\n", "output_dir"),
]:
    # later keys in a mapping are refused as duplicates, so each case rewrites the recipe's own section
    def _build(env, extra=_extra):
        base = env.sft()
        text = Path(base).read_text()
        key = extra.split(":", 1)[0]
        kept = "".join(line + "\n" for line in text.splitlines() if not line.startswith(f"{key}:"))
        if key == "data":
            extra = extra.replace("x.jsonl", str(env.world / "sft_train.jsonl"))
        if key == "model":
            extra = extra.replace("path: x", f"path: {env.base}")
        return ["validate", env.recipe(kept + extra, "v.yaml")]
    case("recipe-value", _name, _culprit)(_build)


def _stage_recipe(stage: str, body: str):
    return lambda env: ["validate", env.recipe(f"stage: {stage}\noutput_dir: {env.out}\n" + body.format(
        world=env.world, base=env.base, sft=env.sft_dir, reward=env.reward), f"{stage}.yaml")]


for _name, _stage, _body, _culprit in [
    ("dpo_beta_zero", "dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\ndpo: {{beta: 0}}\n", "dpo.beta"),
    ("dpo_loss_type", "dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\ndpo: {{loss_type: kto}}\n", "dpo.loss_type"),
    ("dpo_split_and_eval", "dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl, eval: {world}/pref_eval.jsonl}}\n"
     "dpo: {{eval_split: 0.1}}\n", "dpo.eval_split"),
    ("dpo_split_one", "dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\ndpo: {{eval_split: 1.0}}\n", "dpo.eval_split"),
    ("dpo_packing", "dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\ntrain: {{packing: true}}\n", "train.packing"),
    ("dpo_sft_weight_inf", "dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\ndpo: {{sft_weight: .inf}}\n", "dpo.sft_weight"),
    ("reward_center_negative", "reward", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\nreward: {{center_rewards: -1}}\n",
     "reward.center_rewards"),
    ("reward_extra_layers", "reward", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\nreward: {{extra_layers: -2}}\n",
     "reward.extra_layers"),
    ("ppo_no_reward", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\nppo: {{iterations: 2}}\n", "ppo"),
    ("ppo_value_without_rm", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\n"
     "ppo: {{verifier: {world}, gold_weight: 1.0}}\n", "ppo.value_model"),
    ("ppo_temperature_zero", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\n"
     "ppo: {{reward_model: {reward}, temperature: 0}}\n", "ppo.temperature"),
    ("ppo_top_p", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\nppo: {{reward_model: {reward}, top_p: 1.5}}\n",
     "ppo.top_p"),
    ("ppo_gamma", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\nppo: {{reward_model: {reward}, gamma: 2}}\n",
     "ppo.gamma"),
    ("ppo_kl_estimator", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\n"
     "ppo: {{reward_model: {reward}, kl_estimator: k2}}\n", "ppo.kl_estimator"),
    ("ppo_monitor_key", "ppo", "model: {{path: {sft}}}\ndata: {{train: {world}/ppo_prompts.jsonl}}\n"
     "ppo: {{reward_model: {reward}, monitor: {{windw: 3}}}}\n", "ppo.monitor.windw"),
    ("ppo_no_model", "ppo", "data: {{train: {world}/ppo_prompts.jsonl}}\nppo: {{reward_model: {reward}}}\n", "model"),
    ("classify_trainable", "classify", "model: {{path: {base}}}\ndata: {{train: {world}/intent_train.jsonl}}\n"
     "classify: {{trainable: last_blocks:0}}\n", "trainable"),
    ("classify_split", "classify", "model: {{path: {base}}}\ndata: {{train: {world}/intent_train.jsonl}}\n"
     "classify: {{split: {{val: 1.5}}}}\n", "classify.split.val"),
    ("pretrain_both", "pretrain", "model: {{path: {base}, config: {{n_layer: 2}}}}\ndata: {{train: {world}/pretrain.jsonl}}\n", "model"),
    ("pretrain_neither", "pretrain", "model: {{}}\ndata: {{train: {world}/pretrain.jsonl}}\n", "model"),
    ("pretrain_heads", "pretrain", "model: {{config: {{n_embd: 30, n_head: 4}}}}\ndata: {{train: {world}/pretrain.jsonl}}\n", "n_head"),
    ("pretrain_vocab", "pretrain", "model: {{config: {{}}}}\ndata: {{train: {world}/pretrain.jsonl}}\n"
     "pretrain: {{tokenizer: {{vocab_size: 10}}}}\n", "pretrain.tokenizer.vocab_size"),
    ("pretrain_steps_memory", "pretrain", "model: {{config: {{n_layer: 1, n_embd: 16, n_head: 2}}}}\n"
     "data: {{train: {world}/pretrain.jsonl, max_length: 64}}\ntrain: {{max_steps: 100000000000, batch_size: 64}}\n",
     "train.max_steps"),
    ("world_people_zero", "world", "world: {{people: 0}}\n", "world.people"),
    ("world_people_too_many", "world", "world: {{people: 1000000}}\n", "world.people"),
    ("world_probability", "world", "world: {{p_wrong: 2}}\n", "world.p_wrong"),
    ("world_heldout", "world", "world: {{heldout_fraction: 1.0}}\n", "world.heldout_fraction"),
]:
    case("recipe-value", _name, _culprit)(_stage_recipe(_stage, _body))


@case("recipe-value", "lora_rank_absurd", "model.lora.r")
def _(env):
    return ["validate", env.recipe(Path(env.sft()).read_text().replace(
        f"chat_template: {CHATML}}}", f"chat_template: {CHATML}, lora: {{r: 1000000000}}}}"), "lora.yaml")]


@case("recipe-value", "lora_rank_above_width", "model.lora.r")
def _(env):
    return ["sft", env.recipe(Path(env.sft()).read_text().replace(
        f"chat_template: {CHATML}}}", f"chat_template: {CHATML}, lora: {{r: 4096}}}}"), "lora.yaml")]


@case("recipe-value", "float16_on_cpu", "model.dtype")
def _(env):
    return ["sft", env.recipe(Path(env.sft()).read_text().replace(
        f"chat_template: {CHATML}}}", f"chat_template: {CHATML}, dtype: float16}}"), "fp16.yaml")]


for _name, _over, _culprit in [
    ("no_equals", "train.lr", "--set"),
    ("empty_key", "=1", "--set"),
    ("double_dot", "train..lr=1", "--set"),
    ("into_scalar", "seed.x=1", "seed"),
    ("unknown_key", "train.lrr=1", "train.lrr"),
    ("bad_type", "train.lr=abc", "train.lr"),
    ("inf", "train.epochs=.inf", "train.epochs"),
    ("python_tag", "seed=!!python/object/apply:os.system [true]", "seed"),
    ("stage", "stage=dpo", "stage"),
]:
    case("override", _name, _culprit)(lambda env, o=_over: ["sft", env.sft(), "--set", o])


# --- paths in a recipe ---------------------------------------------------------------------------------

@case("paths", "output_dir_is_a_file", "output_dir")
def _(env):
    env.file("afile", "x")
    return ["sft", env.recipe(Path(env.sft()).read_text().replace(f"output_dir: {env.out}", f"output_dir: {env.tmp / 'afile'}"))]


@case("paths", "output_dir_under_a_file", "output_dir")
def _(env):
    env.file("afile", "x")
    return ["sft", env.recipe(Path(env.sft()).read_text().replace(f"output_dir: {env.out}", f"output_dir: {env.tmp / 'afile' / 'run'}"))]


@case("paths", "output_dir_unwritable", "output_dir")
def _(env):
    return ["sft", env.recipe(Path(env.sft()).read_text().replace(f"output_dir: {env.out}", "output_dir: /proc/posttrain-test/run"))]


@case("paths", "output_dir_holds_user_files", "output_dir")
def _(env):
    env.file("out/notes.txt", "mine")
    return ["sft", env.sft()]


for _name, _key, _value, _culprit in [
    ("data_missing", "train", "{tmp}/missing.jsonl", "missing.jsonl"),
    ("data_directory", "train", "{tmp}", "is a directory"),
    ("model_missing_relative", "model", "./no_such_model", "no_such_model"),
    ("model_missing_nested", "model", "{tmp}/models/gpt2-typo", "gpt2-typo"),
    ("model_bare_word", "model", "my-model-that-does-not-exist", "my-model-that-does-not-exist"),
    ("model_under_file", "model", "{tmp}/afile/model", "afile"),
    ("template_missing", "template", "{tmp}/missing.jinja", "missing.jinja"),
    ("eval_prompts_missing", "eval", "{tmp}/missing_prompts.jsonl", "missing_prompts.jsonl"),
]:
    def _build(env, key=_key, value=_value):
        value = value.format(tmp=env.tmp)
        env.file("afile", "x")
        if key == "train":
            return ["sft", env.sft(train=value)]
        if key == "model":
            return ["sft", env.sft(model=value)]
        if key == "template":
            return ["sft", env.recipe(Path(env.sft()).read_text().replace(str(CHATML), value))]
        return ["sft", env.sft(f"eval: {{prompts: {value}}}\n")]
    case("paths", _name, _culprit)(_build)


@case("paths", "unfinished_run_as_model", "DONE")
def _(env):
    run = env.model_copy("unfinished")
    (run / "DONE").unlink()
    return ["sft", env.sft(model=str(run))]


@case("paths", "unverified_import_as_model", "DONE")
def _(env):
    run = env.model_copy("imported")
    (run / "DONE").unlink()
    (run / "recipe.yaml").unlink()
    return ["validate", env.sft(model=str(run))]


# --- data files -------------------------------------------------------------------------------------------

for _name, _content, _culprit in [
    ("jsonl_invalid_json", b'{"messages": [}\n', "bad.jsonl:1"),
    ("jsonl_not_object", b'[1, 2]\n', "bad.jsonl:1"),
    ("jsonl_latin1", '{"text": "caf\xe9"}\n'.encode("latin-1"), "bad.jsonl"),
    ("jsonl_utf16", '{"text": "hi"}\n'.encode("utf-16"), "bad.jsonl"),
    ("jsonl_binary", b"\x89PNG\r\n\x1a\n\x00\x00", "bad.jsonl"),
    ("jsonl_empty", b"", "bad.jsonl"),
    ("jsonl_blank_lines", b"\n\n  \n", "bad.jsonl"),
    ("jsonl_truncated", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assi', "bad.jsonl:1"),
    ("jsonl_nan", b'{"text": NaN}\n', "bad.jsonl:1"),
    ("jsonl_huge_number", b'{"messages": 1e999999}\n', "bad.jsonl:1"),
    ("jsonl_deep_nesting", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "bad.jsonl:1"),
    ("messages_not_list", b'{"messages": "hello"}\n', "bad.jsonl:1"),
    ("messages_empty", b'{"messages": []}\n', "bad.jsonl:1"),
    ("messages_role", b'{"messages": [{"role": "robot", "content": "x"}]}\n', "bad.jsonl:1"),
    ("messages_content_type", b'{"messages": [{"role": "user", "content": 5}]}\n', "bad.jsonl:1"),
    ("messages_no_assistant", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1"),
    ("messages_missing_content", b'{"messages": [{"role": "user"}]}\n', "bad.jsonl:1"),
    ("messages_null", b'{"messages": null}\n', "bad.jsonl:1"),
    ("unknown_fields", b'{"question": "a", "answer": "b"}\n', "bad.jsonl:1"),
    ("prompt_completion_type", b'{"prompt": "a", "completion": 3}\n', "bad.jsonl:1"),
    ("second_row_bad", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                       b'{"messages": [{"role": "user", "content": "a"}]}\n', "bad.jsonl:2"),
]:
    case("data", _name, _culprit)(lambda env, c=_content: ["sft", env.sft(train=str(env.file("bad.jsonl", c)))])

for _name, _fname, _content, _culprit in [
    ("json_not_list", "bad.json", b'{"a": 1}', "bad.json"),
    ("json_invalid", "bad.json", b"[{", "bad.json"),
    ("json_latin1", "bad.json", '[{"text": "caf\xe9"}]'.encode("latin-1"), "bad.json"),
    ("csv_latin1", "bad.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "bad.csv"),
    ("csv_ragged", "bad.csv", b"text,label\na,b,c\n", "bad.csv:2"),
    ("csv_empty", "bad.csv", b"", "bad.csv"),
    ("csv_header_only", "bad.csv", b"text,label\n", "bad.csv"),
    ("csv_no_known_column", "bad.csv", b"a,b\n1,2\n", "bad.csv"),
    ("tsv_binary", "bad.tsv", b"\xff\xfe\x00\x01\tx\n", "bad.tsv"),
    ("parquet_fake", "bad.parquet", b"this is not parquet", "bad.parquet"),
    ("parquet_empty", "bad.parquet", b"", "bad.parquet"),
    ("xlsx", "bad.xlsx", b"PK\x03\x04", "bad.xlsx"),
]:
    case("data", _name, _culprit)(lambda env, f=_fname, c=_content: ["sft", env.sft(train=str(env.file(f, c)))])

for _name, _content, _culprit in [
    ("classify_one_label", b'{"text": "a", "label": "x"}\n' * 30, "one label"),
    ("classify_no_label", b'{"text": "a"}\n', "c.jsonl:1"),
    ("classify_text_type", b'{"text": 5, "label": "x"}\n{"text": "b", "label": "y"}\n', "c.jsonl:1"),
]:
    case("data", _name, _culprit)(lambda env, c=_content: ["classify", env.classify(str(env.file("c.jsonl", c)))])


@case("data", "classify_missing_column", "category")
def _(env):
    return ["classify", env.classify(str(env.world / "intent_train.jsonl"), "classify: {label_column: category}\n")]


@case("data", "preference_missing_rejected", "p.jsonl:1")
def _(env):
    data = env.file("p.jsonl", '{"prompt": "a", "chosen": "b"}\n')
    return ["dpo", env.recipe(f"stage: dpo\nmodel: {{path: {env.sft_dir}}}\ndata: {{train: {data}, max_length: 128}}\noutput_dir: {env.out}\n")]


@case("data", "preference_types", "p.jsonl:1")
def _(env):
    data = env.file("p.jsonl", '{"prompt": "a", "chosen": 1, "rejected": "c"}\n')
    return ["dpo", env.recipe(f"stage: dpo\nmodel: {{path: {env.sft_dir}}}\ndata: {{train: {data}, max_length: 128}}\noutput_dir: {env.out}\n")]


@case("data", "ppo_empty_prompt", "p.jsonl:2")
def _(env):
    data = env.file("p.jsonl", '{"prompt": "Hi"}\n{"prompt": "   "}\n')
    return ["ppo", env.recipe(f"stage: ppo\nmodel: {{path: {env.sft_dir}}}\ndata: {{train: {data}, max_length: 128}}\n"
                              f"ppo: {{reward_model: {env.reward}}}\noutput_dir: {env.out}\n")]


@case("data", "eval_format_differs", "data.eval")
def _(env):
    evals = env.file("e.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return ["sft", env.recipe(Path(env.sft()).read_text().replace("max_length: 128", f"max_length: 128, eval: {evals}"))]


@case("data", "everything_too_long", "data.max_length")
def _(env):
    return ["sft", env.recipe(Path(env.sft()).read_text().replace("max_length: 128", "max_length: 4"))]


# --- checkpoints ------------------------------------------------------------------------------------------

def _broken_model(env, how: str) -> Path:
    m = env.model_copy()
    weights = m / "model.safetensors"
    if how == "no_weights":
        weights.unlink()
    elif how == "zero_byte":
        weights.write_bytes(b"")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "garbage_header":
        weights.write_bytes(struct.pack("<Q", 50) + b"{not json at all....}" + b"\x00" * 100)
    elif how == "shape_mismatch":
        cfg = json.loads((m / "config.json").read_text())
        cfg["n_embd"] = cfg["n_embd"] * 2
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "config_invalid":
        (m / "config.json").write_text("{not json")
    elif how == "config_no_type":
        cfg = json.loads((m / "config.json").read_text())
        cfg.pop("model_type")
        cfg.pop("architectures", None)
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "config_unknown_type":
        cfg = json.loads((m / "config.json").read_text())
        cfg["model_type"] = "no-such-architecture"
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "remote_code":
        cfg = json.loads((m / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        cfg["model_type"] = "evil"
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    elif how in ("pickle_bin", "pickle_evil"):
        import pickle

        weights.unlink()

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo remote-code-ran > " + str(env.tmp / "PWNED"),))

        payload = Evil() if how == "pickle_evil" else {"transformer.wte.weight": [1, 2, 3]}
        with open(m / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    elif how == "no_tokenizer":
        for f in m.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                f.unlink()
    elif how == "tokenizer_broken":
        (m / "tokenizer.json").write_text("{broken")
    elif how == "tokenizer_bigger":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(m)
        tok.add_tokens([f"<extra_{i}>" for i in range(5000)])
        tok.save_pretrained(m)
    elif how == "own_template_syntax":
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{% for m in messages %}{{ m.content }"
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif how == "own_template_sandbox":
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif how == "own_template_raises":
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{{ raise_exception('only system messages allowed') }}"
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    return m


for _how, _culprit in [
    ("no_weights", "model"), ("zero_byte", "model.safetensors"), ("truncated", "model.safetensors"),
    ("garbage_header", "model.safetensors"), ("shape_mismatch", "config.json"), ("config_invalid", "config.json"),
    ("config_no_type", "config.json"), ("config_unknown_type", "no-such-architecture"), ("remote_code", "trust_remote_code"),
    ("pickle_bin", "pytorch_model.bin"), ("pickle_evil", "pytorch_model.bin"), ("no_tokenizer", "tokenizer"),
    ("tokenizer_broken", "tokenizer"), ("tokenizer_bigger", "tokenizer"),
]:
    case("checkpoint", _how, _culprit)(lambda env, h=_how: ["sft", env.sft(model=str(_broken_model(env, h)))])

for _how, _culprit in [("own_template_syntax", "chat_template"), ("own_template_sandbox", "chat_template"),
                       ("own_template_raises", "only system messages allowed")]:
    # the model's own template (no model.chat_template in the recipe)
    case("checkpoint", _how, _culprit)(lambda env, h=_how: ["sft", env.recipe(
        Path(env.sft(model=str(_broken_model(env, h)))).read_text().replace(f", chat_template: {CHATML}", ""))])

for _name, _template, _culprit in [
    ("template_syntax", "{% for m in messages %}{{ m.content }", "t.jinja"),
    ("template_sandbox", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat_template"),
    ("template_undefined_filter", "{{ messages | no_such_filter }}", "t.jinja"),
    ("template_empty", "", "t.jinja"),
    ("template_binary", "\x00\x01", "chat_template"),
]:
    case("checkpoint", _name, _culprit)(lambda env, t=_template: ["sft", env.recipe(
        Path(env.sft()).read_text().replace(str(CHATML), str(env.file("t.jinja", t))))])


@case("checkpoint", "lora_base_gone", "no longer exists")
def _(env):
    run = env.tmp / "lora"
    shutil.copytree(env.lora, run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(env.tmp / "deleted_base")
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    return ["sft", env.sft(model=str(run))]


@case("checkpoint", "adapter_config_invalid", "adapter_config.json")
def _(env):
    run = env.tmp / "lora"
    shutil.copytree(env.lora, run)
    (run / "adapter_config.json").write_text("{oops")
    return ["sft", env.sft(model=str(run))]


# --- commands -------------------------------------------------------------------------------------------

for _name, _args, _culprit in [
    ("missing_dir", ["{tmp}/nope"], "nope"),
    ("not_a_model", ["{tmp}"], "model"),
    ("reward_run", ["{reward}"], "reward"),
    ("temperature_nan", ["{sft}", "--temperature", "nan"], "--temperature"),
    ("temperature_inf", ["{sft}", "--temperature", "inf"], "--temperature"),
    ("temperature_negative", ["{sft}", "--temperature", "-1"], "--temperature"),
    ("max_new_tokens_zero", ["{sft}", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("max_new_tokens_beyond_context", ["{sft}", "--max-new-tokens", "100000"], "--max-new-tokens"),
    ("seed_negative", ["{sft}", "--seed", "-5"], "--seed"),
    ("a_file", ["{sft}/config.json"], "config.json"),
]:
    case("chat", _name, _culprit)(lambda env, a=_args: ["chat", *[x.format(tmp=env.tmp, sft=env.sft_dir, reward=env.reward) for x in a]])


@case("chat", "binary_stdin", "stdin")
def _(env):
    env.stdin = b"\xff\xfe\x00garbage\n"
    return ["chat", str(env.sft_dir)]


@case("chat", "unfinished_run", "DONE")
def _(env):
    run = env.model_copy("unfinished")
    (run / "DONE").unlink()
    return ["chat", str(run)]


@case("chat", "tokenizer_bigger", "tokenizer")
def _(env):
    return ["chat", str(_broken_model(env, "tokenizer_bigger"))]


def _compare(env, *args):
    """`posttrain compare ARGS` on the small world's prompts (a suite of our own unless ARGS name one)."""
    args = [a.format(tmp=env.tmp, sft=env.sft_dir, reward=env.reward, base=env.base, world=env.world) for a in args]
    if "--suite" not in args:
        suite = env.file("s0.yaml", f"prompts: {env.world / 'eval_prompts.jsonl'}\nmetrics: [stop, length, reward, kl]\n"
                                    "limit: 4\nmax_new_tokens: 8\n")
        args += ["--suite", str(suite)]
    return ["compare", *args]


for _name, _args, _culprit in [
    ("spec_without_equals", ["{sft}"], "NAME=RUN_DIR"),
    ("spec_empty_name", ["={sft}"], "NAME=RUN_DIR"),
    ("spec_bad_name", ["a b={sft}"], "model name"),
    ("spec_twice", ["a={sft}", "a={base}"], "twice"),
    ("spec_missing_dir", ["a={tmp}/nope"], "nope"),
    ("spec_reward_run", ["a={reward}"], "--reward"),
    ("spec_not_a_model", ["a={tmp}"], "not a model"),
    ("reward_missing", ["a={sft}", "--reward", "{tmp}/nope"], "--reward"),
    ("reward_not_reward", ["a={sft}", "--reward", "{base}"], "--reward"),
    ("ref_unknown", ["a={sft}", "--ref", "zzz"], "--ref"),
    ("suite_missing", ["a={sft}", "--suite", "{tmp}/nope.yaml"], "--suite"),
    ("limit_zero", ["a={sft}", "--limit", "0"], "--limit"),
    ("prompts_missing", ["a={sft}", "--prompts", "{tmp}/nope.jsonl"], "nope.jsonl"),
    ("out_under_file", ["a={sft}", "--out", "{tmp}/afile/report"], "--out"),
    ("out_is_file", ["a={sft}", "--out", "{tmp}/afile"], "--out"),
    ("out_user_dir", ["a={sft}", "--out", "{tmp}/mine"], "--out"),
    ("out_is_a_run", ["a={sft}", "--out", "{sft}"], "not a compare report"),
]:
    def _build(env, a=_args):
        env.file("afile", "x")
        env.file("mine/notes.txt", "keep me")
        return _compare(env, *a)
    case("compare", _name, _culprit)(_build)

for _name, _suite, _culprit in [
    ("suite_yaml", "metrics: [gold\n", "s.yaml"),
    ("suite_unknown_key", "prompts: {world}/eval_prompts.jsonl\nmetricz: [stop]\n", "metricz"),
    ("suite_unknown_metric", "prompts: {world}/eval_prompts.jsonl\nmetrics: [golden]\n", "golden"),
    ("suite_kl_no_samples", "prompts: {world}/eval_prompts.jsonl\nmetrics: [kl]\nsamples: 0\n", "samples"),
    ("suite_gold_no_verifier", "prompts: {world}/eval_prompts.jsonl\nmetrics: [gold]\n", "verifier"),
    ("suite_no_prompts", "metrics: [stop]\n", "prompts"),
    ("suite_not_mapping", "- a\n- b\n", "s.yaml"),
    ("suite_duplicate_key", "prompts: {world}/eval_prompts.jsonl\nprompts: {world}/probe.jsonl\n", "prompts"),
    ("suite_gold_fields", "prompts: {tmp}/plain.jsonl\nverifier: {world}\nmetrics: [gold]\n", "plain.jsonl:1"),
    ("suite_max_new_tokens_inf", "prompts: {world}/eval_prompts.jsonl\nmax_new_tokens: .inf\n", "max_new_tokens"),
]:
    def _build(env, s=_suite):
        env.file("plain.jsonl", '{"prompt": "hi"}\n')
        suite = env.file("s.yaml", s.format(world=env.world, tmp=env.tmp))
        return _compare(env, "a={sft}", "--suite", str(suite))
    case("compare", _name, _culprit)(_build)

for _name, _args, _culprit in [
    ("missing", ["{tmp}/nope"], "nope"),
    ("not_lora", ["{sft}"], "LoRA"),
    ("out_is_file", ["{lora}", "--out", "{tmp}/afile"], "--out"),
    ("out_under_file", ["{lora}", "--out", "{tmp}/afile/merged"], "--out"),
    ("out_user_dir", ["{lora}", "--out", "{tmp}/mine"], "--out"),
    ("out_is_a_run", ["{lora}", "--out", "{sft}"], "not a merged model"),
]:
    def _build(env, a=_args):
        env.file("afile", "x")
        env.file("mine/notes.txt", "keep me")
        return ["merge", *[x.format(tmp=env.tmp, sft=env.sft_dir, lora=env.lora) for x in a]]
    case("merge", _name, _culprit)(_build)


@case("merge", "unfinished", "DONE")
def _(env):
    run = env.tmp / "lora"
    shutil.copytree(env.lora, run)
    (run / "DONE").unlink()
    return ["merge", str(run)]


def _nanogpt_ckpt(env, how: str) -> Path:
    import torch

    p = env.tmp / "ckpt.pt"
    if how == "zero_byte":
        p.write_bytes(b"")
    elif how == "not_torch":
        p.write_text("hello")
    elif how == "evil":
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(env.tmp / "PWNED"),))

        with open(p, "wb") as f:
            pickle.dump({"model": Evil()}, f)
    elif how == "wrong_keys":
        torch.save({"weights": {}}, p)
    elif how in ("nan", "good"):
        args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=50304, dropout=0.0)
        g = torch.Generator().manual_seed(0)
        sd = {"transformer.wte.weight": torch.randn(50304, 16, generator=g) * 0.02,
              "transformer.wpe.weight": torch.randn(32, 16, generator=g) * 0.02,
              "transformer.ln_f.weight": torch.ones(16), "transformer.ln_f.bias": torch.zeros(16),
              "lm_head.weight": None}
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
        for k, shape in (("ln_1.weight", (16,)), ("ln_1.bias", (16,)), ("attn.c_attn.weight", (48, 16)),
                         ("attn.c_attn.bias", (48,)), ("attn.c_proj.weight", (16, 16)), ("attn.c_proj.bias", (16,)),
                         ("ln_2.weight", (16,)), ("ln_2.bias", (16,)), ("mlp.c_fc.weight", (64, 16)), ("mlp.c_fc.bias", (64,)),
                         ("mlp.c_proj.weight", (16, 64)), ("mlp.c_proj.bias", (16,))):
            sd[f"transformer.h.0.{k}"] = torch.ones(shape) if "ln" in k and "weight" in k else torch.randn(shape, generator=g) * 0.02
        if how == "nan":
            sd["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
        torch.save({"model": sd, "model_args": args}, p)
    return p


for _name, _how, _out, _culprit in [
    ("missing", None, "{tmp}/o", "nope.pt"),
    ("zero_byte", "zero_byte", "{tmp}/o", "ckpt.pt"),
    ("not_torch", "not_torch", "{tmp}/o", "ckpt.pt"),
    ("evil_pickle", "evil", "{tmp}/o", "ckpt.pt"),
    ("wrong_keys", "wrong_keys", "{tmp}/o", "ckpt.pt"),
    ("nan_weights", "nan", "{tmp}/o", "ckpt.pt"),
    ("out_under_file", "good", "{tmp}/afile/o", "afile"),
    ("out_is_file", "good", "{tmp}/afile", "afile"),
    ("out_not_empty", "good", "{tmp}/mine", "mine"),
    ("out_is_a_run", "good", "{sft}", "not an earlier import"),
]:
    def _build(env, how=_how, out=_out):
        env.file("afile", "x")
        env.file("mine/notes.txt", "keep me")
        ckpt = _nanogpt_ckpt(env, how) if how else env.tmp / "nope.pt"
        return ["import-nanogpt", str(ckpt), out.format(tmp=env.tmp, sft=env.sft_dir), "--force"]
    case("import-nanogpt", _name, _culprit)(_build)


for _name, _args, _culprit in [
    ("index_out_of_range", ["--index", "100000"], "--index"),
    ("index_negative", ["--index", "-1"], "--index"),
    ("split_eval_missing", ["--split", "eval"], "data.eval"),
]:
    case("show-mask", _name, _culprit)(lambda env, a=_args: ["show-mask", env.sft(), *a])


@case("show-mask", "not_sft", "stage")
def _(env):
    return ["show-mask", _stage_recipe("dpo", "model: {{path: {sft}}}\ndata: {{train: {world}/pref_train.jsonl}}\n")(env)[1]]


for _name, _accel, _culprit in [
    ("accel_missing", "{tmp}/nope.yaml", "--accel"),
    ("accel_yaml", "{tmp}/a.yaml", "a.yaml"),
    ("accel_bool", "{tmp}/b.yaml", "distributed_type"),
    ("accel_unknown_key", "{tmp}/c.yaml", "c.yaml"),
]:
    def _build(env, a=_accel):
        env.file("a.yaml", "distributed_type: [\n")
        env.file("b.yaml", "distributed_type: NO\nnum_processes: 1\n")
        env.file("c.yaml", "distributed_type: MULTI_GPU\nnum_processes: 2\nnum_procesess: 2\n")
        return ["validate", env.sft(), "--accel", a.format(tmp=env.tmp)]
    case("validate", _name, _culprit)(_build)


@case("validate", "fsdp_lora_new_tokens_tied", "tied")
def _(env):  # GPT-2's tied embeddings, new ChatML rows, LoRA: FSDP2 cannot shard peft's shared delta
    lora = Path(env.sft()).read_text().replace(f"chat_template: {CHATML}}}", f"chat_template: {CHATML}, lora: {{r: 4}}}}")
    return ["validate", env.recipe(lora, "lora.yaml"), "--accel", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")]


@case("validate", "zero3_ppo", "ZeRO-3")
def _(env):  # our PPO loop checks gradients before a step DeepSpeed takes inside backward: FSDP2 only
    return ["validate", _ppo(env), "--accel", str(ROOT / "recipes" / "accelerate" / "zero3.yaml")]


def _ppo(env, name: str = "ppo.yaml") -> str:
    return env.recipe(f"stage: ppo\nmodel: {{path: {env.sft_dir}}}\ndata: {{train: {env.world}/ppo_prompts.jsonl, max_length: 128}}\n"
                      f"ppo: {{verifier: {env.world}, gold_weight: 1.0, rm_weight: 0, value_model: head}}\n"
                      f"output_dir: {env.out}\n", name)


@case("validate", "fsdp_ppo_layer_class", "LlamaDecoderLayer")
def _(env):  # a block class the policy lacks: accelerate would fail in every process after the models loaded
    raw = (ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text().replace("GPT2Block", "LlamaDecoderLayer")
    return ["validate", _ppo(env), "--accel", str(env.file("llama_fsdp.yaml", raw))]


@case("checkpoint", "ppo_resume_other_process_count", "written by 2 process(es) and this run has 1")
def _(env):  # a sharded PPO run's checkpoint (whole tensors, but per-process RNG streams) resumed by 1 process
    from posttrain.recipe_file import load_recipe
    from posttrain.runs import EXTRA_STATE_FILE, recipe_yaml

    recipe = _ppo(env)
    env.file("out/recipe.yaml", recipe_yaml(load_recipe(recipe)))
    env.file(f"out/checkpoints/checkpoint-1/{EXTRA_STATE_FILE}", json.dumps({"processes": 2}))
    return ["ppo", recipe]


class _Runs:
    """Unpickling this runs os.system: what a poisoned checkpoint file carries."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@case("checkpoint", "resume_poisoned_pickle", "refused: loading it would run code")
def _(env):  # an unfinished run whose optimizer.pt names code: refused before the stage loads anything
    import torch

    from posttrain.recipe_file import load_recipe
    from posttrain.runs import recipe_yaml

    recipe = env.sft()
    env.file("out/recipe.yaml", recipe_yaml(load_recipe(recipe)))
    ckpt = env.file("out/checkpoints/checkpoint-1/trainer_state.json", "{}").parent
    torch.save({"state": _Runs()}, ckpt / "optimizer.pt")
    return ["sft", recipe]


@case("recipe-value", "chat_template_is_data", "not a chat template")
def _(env):  # a data file named as the template: valid Jinja text that renders no conversation
    recipe = Path(env.sft()).read_text().replace(f"chat_template: {CHATML}", f"chat_template: {env.world}/sft_train.jsonl")
    return ["validate", env.recipe(recipe, "data_as_template.yaml")]


@case("checkpoint", "pretrain_from_junk_pt", "not a PyTorch checkpoint")
def _(env):  # a .pt given as the model to continue pretraining: read as a nanoGPT checkpoint, and this is none
    junk = env.file("junk.pt", b"not a pickle at all")
    return ["pretrain", env.recipe(f"stage: pretrain\nmodel: {{path: {junk}}}\ndata: {{train: {env.world}/pretrain.jsonl, "
                                   f"max_length: 64}}\ntrain: {{max_steps: 1}}\noutput_dir: {env.out}\n", "pretrain.yaml")]


@case("checkpoint", "resume_other_process_count", "written by 2 process(es) and this run has 1")
def _(env):  # an unfinished run of the same recipe whose checkpoint two processes wrote: refused before loading
    from posttrain.recipe_file import load_recipe
    from posttrain.runs import EXTRA_STATE_FILE, recipe_yaml

    recipe = env.sft()
    env.file("out/recipe.yaml", recipe_yaml(load_recipe(recipe)))
    env.file(f"out/checkpoints/checkpoint-1/{EXTRA_STATE_FILE}", json.dumps({"processes": 2}))
    return ["sft", recipe]


# --- running them ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, small_world, tiny_base) -> Path:
    """A LoRA SFT run on the tiny base (two steps): for the adapter cases."""
    from conftest import cli

    out = tmp_path_factory.mktemp("lora") / "lora"
    recipe = write(out.parent / "lora.yaml", f"""\
stage: sft
model: {{path: {tiny_base}, chat_template: {CHATML}, lora: {{r: 4, alpha: 8}}}}
data: {{train: {small_world}/sft_train.jsonl, max_length: 128, limit: 16}}
train: {{max_steps: 2, batch_size: 8, save_every: 100}}
output_dir: {out}
""")
    cli("sft", str(recipe), check=True)
    return out


@pytest.fixture()
def env(tmp_path, small_world, tiny_base, tiny_sft, tiny_reward, tiny_lora) -> Env:
    return Env(tmp_path, small_world, tiny_base, tiny_sft, tiny_reward, tiny_lora)


# --- a fuzz pass: every file a command reads, given hostile contents ----------------------------------
# Each slot is a file argument of a command (a recipe's data file, template, model path; a command's own
# path argument); each content is something a user's disk can hold there. Every pair must end in the
# same one clear line naming the file, never the last-resort handler.

FUZZ_CONTENTS = {
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "not_utf8": b'{"prompt": "caf\xe9"}\n',
    "truncated_json": b'{"prompt": "Where does Ada',
    "json_scalar": b"42\n",
    "json_list": b'[{"prompt": "Hi"}]\n',
    "directory": None,  # a directory where a file is expected (or a file's place taken by an empty one)
}


def _data_recipe(stage: str, body: str = ""):
    """`stage` from the session's SFT model on the data file p; `body` may name {reward}."""
    return lambda env, p: [stage, env.recipe(f"stage: {stage}\nmodel: {{path: {env.sft_dir}}}\n"
                                             f"data: {{train: {p}, max_length: 128}}\n"
                                             f"{body.format(reward=env.reward)}output_dir: {env.out}\n")]


FUZZ_SLOTS = {
    "sft_data": lambda env, p: ["sft", env.sft(train=str(p))],
    "sft_eval_data": lambda env, p: ["sft", env.recipe(
        f"stage: sft\nmodel: {{path: {env.base}, chat_template: {CHATML}}}\n"
        f"data: {{train: {env.world / 'sft_train.jsonl'}, eval: {p}, max_length: 128, limit: 16}}\n"
        f"train: {{max_steps: 1, batch_size: 4}}\noutput_dir: {env.out}\n")],
    "sft_chat_template": lambda env, p: ["sft", env.recipe(
        f"stage: sft\nmodel: {{path: {env.base}, chat_template: {p}}}\n"
        f"data: {{train: {env.world / 'sft_train.jsonl'}, max_length: 128, limit: 16}}\noutput_dir: {env.out}\n")],
    "sft_model": lambda env, p: ["sft", env.sft(model=str(p))],
    "reward_data": _data_recipe("reward"),
    "dpo_data": _data_recipe("dpo"),
    "classify_data": lambda env, p: ["classify", env.classify(str(p))],
    "ppo_prompts": _data_recipe("ppo", "ppo: {{reward_model: {reward}}}\n"),
    "grpo_prompts": _data_recipe("grpo", "grpo: {{rewards: [{{source: format}}]}}\n"),
    "pretrain_corpus": lambda env, p: ["pretrain", env.recipe(
        f"stage: pretrain\nmodel: {{config: {{n_layer: 1, n_embd: 32, n_head: 2}}}}\ndata: {{train: {p}, max_length: 64}}\n"
        f"train: {{max_steps: 1}}\noutput_dir: {env.out}\n")],
    "compare_suite": lambda env, p: ["compare", f"sft={env.sft_dir}", "--suite", str(p), "--out", str(env.out)],
    "compare_model": lambda env, p: _compare(env, f"x={p}", "--out", str(env.out)),
    "chat_model": lambda env, p: ["chat", str(p)],
    "merge_run": lambda env, p: ["merge", str(p), "--out", str(env.out)],
    "nanogpt_checkpoint": lambda env, p: ["import-nanogpt", str(p), str(env.out)],
}


def _fuzz(slot: str, content: str):
    def build(env):
        p = env.tmp / f"hostile_{content}"
        if FUZZ_CONTENTS[content] is None:
            p.mkdir()
        else:
            p.write_bytes(FUZZ_CONTENTS[content])
        return FUZZ_SLOTS[slot](env, p)
    return build


for _slot in FUZZ_SLOTS:
    for _content in FUZZ_CONTENTS:
        CASES.append(Case("fuzz", f"{_slot}-{_content}", _fuzz(_slot, _content), "hostile_"))


def test_there_are_150_cases_or_more():
    kinds = Counter(c.kind for c in CASES)
    assert len(CASES) >= 150, kinds
    assert len({repr(c) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=repr)
def test_bad_input_is_one_clear_line(bad: Case, env: Env, capfd, monkeypatch):
    argv = bad.build(env)
    before = _snapshot(env.tmp)
    shared = {d: _snapshot(d) for d in (env.base, env.sft_dir, env.reward, env.lora)}
    if env.stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(env.stdin), encoding="utf-8"))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    shown = f"posttrain {' '.join(argv)}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert code == 2, shown
    assert "Traceback" not in out + err, shown
    assert "internal error" not in err, shown  # reached the last-resort handler: a kind without its own message
    assert 1 <= len(lines) <= 2 and len(err) < 1500, shown
    assert bad.culprit.lower() in err.lower(), shown
    assert not (env.tmp / "PWNED").exists(), "a pickle ran code"
    for d, files in shared.items():  # the session's models, which cases point --out at: untouched
        assert _snapshot(d) == files, f"{d} changed\n{shown}"
    after = _snapshot(env.tmp)
    assert not [p for p in before if p not in after], f"deleted: {sorted(set(before) - set(after))}\n{shown}"
    written = [p for p in after if p not in before and not Path(p).name.startswith(".")]
    assert not written, f"half-written: {written}\n{shown}"


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_there_are_enough_cases_of_every_kind():
    kinds = Counter(c.kind for c in CASES)
    assert kinds["recipe-file"] + kinds["recipe-value"] + kinds["override"] >= 50
    assert kinds["data"] >= 30 and kinds["checkpoint"] >= 20 and kinds["fuzz"] >= 100
    commands = {"chat", "compare", "merge", "import-nanogpt", "show-mask", "validate"}
    assert commands <= set(kinds), commands - set(kinds)


def test_a_bug_prints_one_line_and_keeps_the_traceback(monkeypatch, capfd, tmp_path):
    """The last-resort handler: an exception that is not bad input (a bug) is one line naming the log file
    that holds the traceback, exit code 1, never a bare traceback."""
    import posttrain.cli as cli_module

    def broken(args):
        raise RuntimeError("an invariant broke inside posttrain")

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(cli_module, "_validate", broken)
    code = main(["validate", "some.yaml"])
    out, err = capfd.readouterr()
    assert code == 1 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error: RuntimeError: an invariant broke inside posttrain" in lines[0]
    logs = list((tmp_path / "posttrain").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    text = logs[0].read_text()
    assert "Traceback" in text and "an invariant broke" in text and "command: posttrain validate some.yaml" in text


def test_a_diverging_run_stops_without_done(env: Env, capfd):
    """lr 1e6: the loss turns non-finite within a few steps; the run stops with one line and no DONE."""
    recipe = env.recipe(Path(env.sft()).read_text().replace("train: {max_steps: 1, batch_size: 4}",
                                                           "train: {max_steps: 6, batch_size: 4, lr: 1000000.0}\nlogging: {every: 1}"))
    code = main(["sft", recipe])
    out, err = capfd.readouterr()
    assert code == 2 and "Traceback" not in out + err, err
    assert "diverged" in err or "NaN or inf" in err, err
    assert not (env.out / "DONE").exists()


def test_done_is_never_written_over_nan_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from posttrain.errors import UserError
    from posttrain.runs import check_finite_weights

    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="model.safetensors: w holds NaN"):
        check_finite_weights(tmp_path)
    save_file({"w": torch.tensor([1.0, 2.0])}, str(tmp_path / "model.safetensors"))
    check_finite_weights(tmp_path)
