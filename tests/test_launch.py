"""posttrain/launch_rules.py: the launcher configs in recipes/accelerate/ read as accelerate reads them, and
the rules of check_launch on real recipes and configs, for this machine and for imagined ones
(`cuda=`, `deepspeed=`). Nothing is trained; each test takes well under a second (one runs the CLI)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, cli, write

from posttrain.errors import UserError
from posttrain.launch_rules import check_launch, read_config
from posttrain.recipe_file import load_recipe
from posttrain.stages import STAGES as REGISTRY

ACCEL = ROOT / "recipes" / "accelerate"
GPT2 = ROOT / "recipes" / "gpt2"
STAGES = [name for name in REGISTRY if name != "world"]  # every stage that trains a model


def recipe(stage: str, *overrides: str):
    """A shipped recipes/gpt2 recipe (schema only: nothing it names is read), fp32 unless overridden."""
    return load_recipe(GPT2 / f"{stage}.yaml", ["model.dtype=float32", *overrides])


def config(tmp_path, name: str, **changes) -> str:
    """A copy of recipes/accelerate/NAME.yaml with top-level keys changed (None deletes one)."""
    raw = yaml.safe_load((ACCEL / f"{name}.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return str(write(tmp_path / f"{name}_changed.yaml", yaml.safe_dump(raw)))


def refused(match: str | None, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as e:
        check_launch(*args, **kwargs)
    assert "\n" not in str(e.value)  # one line: the combination, the reason, the fix
    return str(e.value)


@pytest.mark.parametrize(("name", "kind", "processes"), [("single", "NO", 1), ("ddp", "MULTI_GPU", 8),
                                                         ("fsdp", "FSDP", 8), ("zero2", "DEEPSPEED", 8),
                                                         ("zero3", "DEEPSPEED", 8)])
def test_shipped_configs_read_as_accelerate_reads_them(name, kind, processes):
    launch = read_config(ACCEL / f"{name}.yaml")
    assert (launch.distributed_type, launch.num_processes, launch.mixed_precision) == (kind, processes, "no")
    if name == "fsdp":
        assert launch.fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name.startswith("zero"):
        assert launch.deepspeed["zero_stage"] == int(name[-1])


def test_config_mistakes_accelerate_would_miss_or_report_late(tmp_path):
    bare_no = write(tmp_path / "bare.yaml", (ACCEL / "single.yaml").read_text().replace('"NO"', "NO"))
    with pytest.raises(UserError, match="YAML boolean; quote the value"):
        read_config(bare_no)
    with pytest.raises(UserError, match="accelerate rejects it"):
        read_config(config(tmp_path, "ddp", num_procesess=2))
    text = (ACCEL / "fsdp.yaml").read_text().replace("fsdp_transformer_layer_cls_to_wrap", "fsdp_transformer_layer_cls_to_warp")
    with pytest.raises(UserError, match="did you mean 'fsdp_transformer_layer_cls_to_wrap'"):
        read_config(write(tmp_path / "typo.yaml", text))
    with pytest.raises(UserError, match="no such accelerate config"):
        read_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_runs_as_one_process_or_ddp_on_a_cpu(stage):
    assert check_launch(recipe(stage), None, cuda=False) == []
    assert check_launch(recipe(stage), ACCEL / "single.yaml", cuda=False) == []
    notes = check_launch(recipe(stage), ACCEL / "ddp.yaml", num_processes=2, cuda=False)
    assert "2 processes on the CPU, data parallel over gloo" in notes[0]
    assert ("ppo.rollout_batch_size" if stage == "ppo" else "global batch is 2 x batch_size") in notes[0]


def test_launchers_that_start_one_process_refuse_several(tmp_path):
    refused("accelerate starts only one process", recipe("sft"), ACCEL / "single.yaml", num_processes=2, cuda=False)
    cpu = config(tmp_path, "ddp", distributed_type="MULTI_CPU")
    refused("starts only one process.*use recipes/accelerate/ddp.yaml", recipe("sft"), cpu, num_processes=2, cuda=False)


def test_the_trainer_joins_the_cpu_process_group(monkeypatch):
    """Without CUDA the Trainer stages ask for the CPU (TrainingArguments(use_cpu=True)); if that were
    dropped, N processes would each train alone, and validate says so."""
    import posttrain.training as training

    kwargs = training.trainer_kwargs(recipe("sft"), SimpleNamespace(checkpoints=Path("unused")))
    assert kwargs["use_cpu"] is (not torch.cuda.is_available())
    if torch.cuda.is_available():
        pytest.skip("the rule applies on a machine without CUDA")
    real = training.trainer_kwargs
    monkeypatch.setattr(training, "trainer_kwargs", lambda *a, **k: {**real(*a, **k), "use_cpu": False})
    refused("each process would train alone", recipe("dpo"), ACCEL / "ddp.yaml", num_processes=2, cuda=False)
    check_launch(recipe("ppo"), ACCEL / "ddp.yaml", num_processes=2, cuda=False)  # PPO has its own Accelerator


def test_without_cuda_half_precision_is_refused_and_deepspeed_runs_on_its_cpu_accelerator(tmp_path):
    for name in ("zero2", "zero3"):
        notes = check_launch(recipe("sft"), ACCEL / f"{name}.yaml", num_processes=2, cuda=False, deepspeed=True)
        assert any("data parallel over gloo" in n for n in notes)
        refused("deepspeed package is not installed", recipe("sft"), ACCEL / f"{name}.yaml", num_processes=2,
                cuda=False, deepspeed=False)
    refused("mixed_precision bf16 needs a CUDA GPU", recipe("sft"), config(tmp_path, "ddp", mixed_precision="bf16"),
            num_processes=2, cuda=False)
    refused("model.dtype bfloat16: needs a CUDA GPU", recipe("dpo", "model.dtype=bfloat16"), None, cuda=False)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("cuda", [False, True])
def test_fsdp_and_zero3_take_every_training_stage_but_ppo_on_deepspeed(stage, cuda):
    """FSDP runs on a CPU too (posttrain/sharding.py), for every stage, PPO and GRPO included (they
    gather the policy once per rollout); ZeRO-3 takes the same stages but PPO, whose loop checks the
    gradients before a step that DeepSpeed's engine takes inside backward."""
    fsdp = ACCEL / "fsdp.yaml"
    notes = check_launch(recipe(stage), fsdp, num_processes=2, cuda=cuda, deepspeed=True)
    assert all("\n" not in n for n in notes)
    if stage in ("dpo", "reward", "ppo", "grpo"):  # LoRA too (sft: below)
        check_launch(recipe(stage, "model.lora={r: 8}"), fsdp, num_processes=2, cuda=cuda, deepspeed=True)
    zero3 = ACCEL / "zero3.yaml"
    if stage == "ppo":
        for config in ("zero2.yaml", "zero3.yaml"):
            message = refused(None, recipe(stage), ACCEL / config, num_processes=8, cuda=cuda, deepspeed=True)
            assert "our PPO loop checks every gradient" in message and "fsdp.yaml" in message
    else:
        check_launch(recipe(stage), zero3, num_processes=2, cuda=cuda, deepspeed=True)


def test_sharding_refuses_lora_with_new_chat_tokens_where_peft_cannot_build_them(tiny_base, tiny_sft, tmp_path):
    """peft's delta for new token rows is shared by tied input and output embeddings, which FSDP2 (as
    accelerate cuts the model) cannot shard; everything else about LoRA SFT under FSDP is allowed."""
    from families import build_checkpoint

    from posttrain.sharding import check_stage, template_rows

    fsdp, chatml = ACCEL / "fsdp.yaml", ROOT / "data_templates" / "chatml.jinja"
    lora = ("model.lora={r: 8}", f"model.chat_template={chatml}")
    message = refused("LoRA with new chat tokens fails under FSDP2", recipe("sft", f"model.path={tiny_base}", *lora),
                      fsdp, num_processes=2, cuda=False)
    assert f"{tiny_base} is one" in message and "ddp.yaml" in message
    # the SFT run already has the template's tokens; GPT-2 from the Hub cannot be told offline (refused)
    check_launch(recipe("sft", f"model.path={tiny_sft}", *lora), fsdp, num_processes=2, cuda=False)
    refused("only a local copy of openai-community/gpt2 tells", recipe("sft", *lora), fsdp, num_processes=2, cuda=False)
    check_launch(recipe("sft", f"model.path={tiny_base}", f"model.chat_template={chatml}"), fsdp, num_processes=2,
                 cuda=False)  # full fine-tuning
    untied = build_checkpoint("llama", tmp_path / "llama", ["Ada Lang lives in Paris."] * 20)
    assert template_rows(recipe("sft", f"model.path={untied}", *lora).model) == (True, False)  # new rows, untied: allowed
    check_stage(recipe("sft", f"model.path={untied}", *lora))  # (fsdp.yaml names GPT-2's block, not Llama's)
    # ZeRO-3: peft builds new token rows on CUDA only
    zero3 = ACCEL / "zero3.yaml"
    refused("peft builds the new rows under ZeRO-3 on CUDA only", recipe("sft", f"model.path={tiny_base}", *lora), zero3,
            num_processes=2, cuda=False, deepspeed=True)
    check_launch(recipe("sft", f"model.path={tiny_base}", *lora), zero3, num_processes=2, cuda=True, deepspeed=True)
    check_launch(recipe("sft", f"model.path={tiny_sft}", *lora), zero3, num_processes=2, cuda=False, deepspeed=True)


def test_zero2_needs_deepspeed_and_follows_the_recipe(tmp_path):
    refused("deepspeed package is not installed", recipe("sft"), ACCEL / "zero2.yaml", num_processes=8, cuda=True,
            deepspeed=False)
    assert all("GPU(s)" in n for n in check_launch(recipe("sft"), ACCEL / "zero2.yaml", num_processes=8, cuda=True,
                                                     deepspeed=True))
    raw = yaml.safe_load((ACCEL / "zero2.yaml").read_text())
    raw["deepspeed_config"]["gradient_accumulation_steps"] = 4
    mismatch = write(tmp_path / "zero2_ga.yaml", yaml.safe_dump(raw))
    refused("gradient_accumulation_steps: 4 differs from the recipe's train.grad_accum", recipe("dpo"), mismatch,
            num_processes=8, cuda=True, deepspeed=True)
    check_launch(recipe("dpo", "train.grad_accum=4"), mismatch, num_processes=8, cuda=True, deepspeed=True)
    refused("our PPO loop checks every gradient", recipe("ppo"), ACCEL / "zero2.yaml", num_processes=8, cuda=True,
            deepspeed=True)


def test_validate_with_a_launcher_config():
    ok = cli("validate", "--offline", str(GPT2 / "sft.yaml"), "--accel", str(ACCEL / "ddp.yaml"),
             env={"OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0, ok.stderr
    assert "data parallel over gloo" in ok.stdout and "launched with" in ok.stdout
    if torch.cuda.is_available():
        return
    bad = cli("validate", "--offline", str(GPT2 / "sft.yaml"), "--accel", str(ACCEL / "single.yaml"), "--set",
              "model.dtype=bfloat16")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "needs a CUDA GPU" in bad.stderr


def test_the_readme_shows_the_launch_table_the_code_decides():
    from posttrain.launch_rules import support_table

    table = support_table(cuda=True)
    assert table in (ROOT / "README.md").read_text(), "README's launch table is stale: paste `posttrain launches --gpu`"
    assert "| fsdp | yes |" in table and "| zero3 | yes |" in table
    out = cli("launches", "--gpu")
    assert out.returncode == 0 and out.stdout == table
