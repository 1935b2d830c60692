"""Sharded training (FSDP2, DeepSpeed ZeRO) for the Trainer stages: what each can take, how a stage
gets its whole model back at the end, and how much training state each process holds.

A stage trains sharded on every process, then finishes (evaluates, saves) on rank 0 alone, as it
does unsharded. `unshard` is the bridge: every process joins in gathering the full weights, and
rank 0 puts them into a weightless copy of the model taken before sharding (`skeleton`), which
becomes `trainer.model` for the rest of the stage. A full model and a LoRA (peft) model come back
alike, so evaluation, saving and merging an adapter run the code and cost of an unsharded run, on
the sharded model's weights exactly. Rank 0 evaluates, rather than every rank on its shard: the
stages' evaluation generates, and generation through sharded modules would gather every layer's
weights at every new token.

On a machine without a GPU accelerate never takes the FSDP path: `AcceleratorState.__init__`
(accelerate/state.py) turns an FSDP launch into FSDP only for GPU-like process groups and leaves a
CPU one (MULTI_CPU, gloo) as plain data parallel, silently. `fsdp_on_cpu` sets the distributed type
that branch would have set, and nothing else; everything after it (accelerate's fsdp2_prepare_model,
which calls torch's fully_shard, its full-state-dict gathering, the Trainer's FSDP save and
checkpoint code) is the code a GPU run executes. torch's FSDP2 itself supports CPU over gloo.
DeepSpeed has a CPU accelerator of its own; `deepspeed_on_cpu` records for accelerate the process
group DeepSpeed made there, which accelerate does for GPU groups only.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback


def fsdp_launch() -> bool:
    """Whether this process was launched with an FSDP accelerate config (the launcher sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_launch() -> bool:
    """Whether this process was launched with a DeepSpeed accelerate config (the launcher sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_on_cpu() -> None:
    """Let a DeepSpeed launch run ZeRO on a CPU (DeepSpeed's CPU accelerator, gloo). Call before any
    Accelerator or TrainingArguments exists, and ask for the CPU through neither (use_cpu=False):
    accelerate builds a DeepSpeed state only without cpu=True (accelerate/state.py
    PartialState.__init__). There, with no GPU, it finds no backend and records one process, while
    DeepSpeed's own init_distributed has joined every process over gloo; DeepSpeed then stops on
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size". This
    records the process group DeepSpeed made (backend, world size, rank, the CPU as the device),
    as accelerate does for a GPU group, and nothing else."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own switch; it guesses otherwise
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.PartialState.__init__
    if getattr(init, "posttrain_deepspeed_on_cpu", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        dist = torch.distributed
        if self.distributed_type == DistributedType.DEEPSPEED and self.backend is None and dist.is_initialized():
            self.backend = dist.get_backend()
            self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cpu")

    __init__.posttrain_deepspeed_on_cpu = True
    state.PartialState.__init__ = __init__


def fsdp_on_cpu() -> None:
    """Let an FSDP launch shard on a CPU (gloo) process group. Call before any Accelerator exists."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "posttrain_fsdp_on_cpu", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            # what the GPU branch of AcceleratorState.__init__ does for ACCELERATE_USE_FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__.posttrain_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = __init__


# Stages whose end gathers through unshard() (PPO gathers its own, PPOTrainer.whole_policy). PPO and
# GRPO generate while they train, with the policy's weights gathered once per rollout (whole_weights).
FSDP_STAGES = ("pretrain", "sft", "classify", "reward", "dpo", "ppo", "grpo")


@contextlib.contextmanager
def whole_weights(root: nn.Module, accelerator=None):
    """Inside it, every weight of `root` (the module FSDP2 or DeepSpeed ZeRO-3 sharded, or its engine)
    is whole on every process, gathered once on entry and freed on exit, so that a generation of many
    tokens runs on local weights with no collective per token. Without it, FSDP2 gathers each block
    again for every decoded token (and every process must run the same number of forwards, or the
    one that stopped early leaves the others waiting in an all-gather). Every process must enter it
    together. A no-op for a model that is not sharded.

    FSDP2: `unshard()` on every FSDP module (the root's lazy init first, which a forward through an
    inner module would otherwise claim for itself), with resharding after forward switched off for the
    duration, then `reshard()`. ZeRO-3: deepspeed.zero.GatheredParameters, with DeepSpeed's own gather
    hooks lifted meanwhile, as TRL's unwrap_model_for_generation does."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if fsdp:
        if fsdp[0] is not root:
            raise ValueError("whole_weights needs the root FSDP module, the one fully_shard was applied to last")
        root._get_fsdp_state()._lazy_init()
        groups = [g for m in fsdp for g in m._get_fsdp_state()._fsdp_param_groups]
        kept = [g.post_forward_mesh_info for g in groups]
        for m in fsdp:
            m.unshard()
        for g in groups:
            g.post_forward_mesh_info = None  # forward leaves them whole
        try:
            yield
        finally:
            for g, info in zip(groups, kept, strict=True):
                g.post_forward_mesh_info = info
            for m in fsdp:
                m.reshard()
        return
    if accelerator is not None and is_zero3(accelerator):
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(root, accelerator, gather_deepspeed3_params=True), _no_step_hook(root):
            yield
        return
    yield


@contextlib.contextmanager
def _no_step_hook(engine):
    """Lift the forward pre-hook ZeRO-3 keeps on the root module besides the per-module hooks TRL lifts:
    it checks, in a collective, that every process traces the same parameters, so a forward by the
    main process alone (an evaluation) would wait for the others forever."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    handle = getattr(offload, "fwd_pre_hook", None)
    hooks = getattr(getattr(offload, "module", None), "_forward_pre_hooks", {})
    hook = hooks.pop(handle.id, None) if handle is not None else None
    try:
        yield
    finally:
        if hook is not None:
            hooks[handle.id] = hook


def trainer_weights(trainer):
    """whole_weights for a Trainer's model: its DeepSpeed engine under DeepSpeed, else the model
    (FSDP2 shards it in place)."""
    root = trainer.model_wrapped if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model
    return whole_weights(root, trainer.accelerator)


def shard_frozen(model: nn.Module, accelerator, free_root: bool = True) -> nn.Module:
    """Shard a frozen model (a reference policy, a reward model) with FSDP2 as accelerate shards a trained
    one (the launch config's blocks and the root), in place. `free_root`: also free the root's own
    weights (embeddings, final norm) after each forward; FSDP2 keeps them whole for the backward that
    follows, which a frozen model never has. Keep them when code reads a root weight outside the
    forward (a reward model's score head, applied to the hidden states by models.last_token_logits)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(accelerator, model)
    if free_root:
        model.set_reshard_after_forward(True)
    return model


def gather_whole(sharded: nn.Module, structure: nn.Module | None, accelerator, prefix: str = "") -> nn.Module | None:
    """The whole weights of the FSDP2 module `sharded` (or of its submodule under `prefix`) put into
    `structure`, skeleton(...) of that module taken before sharding, on the main process; None on
    the others. Every process must call it: each contributes its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    whole = fill(structure, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return whole.to(accelerator.device).eval()


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def check_stage(recipe, kind: str = "FSDP", cuda: bool | None = None) -> None:
    """Refuse, in one line, what sharded weights (`kind`: FSDP, ZeRO-2 or ZeRO-3) cannot take in posttrain
    (yet), before any model loads. `cuda`: whether the machine has a CUDA GPU (default: this one)."""
    from posttrain.errors import UserError

    where = f"{recipe.stage} under {kind}"
    if recipe.stage == "ppo" and kind != "FSDP":
        raise UserError(f"{where}: our PPO loop checks every gradient for NaN before its optimizer step, which "
                        "DeepSpeed's engine takes inside backward; shard PPO with recipes/accelerate/fsdp.yaml (FSDP2), "
                        "or launch it with ddp.yaml")
    if recipe.stage not in FSDP_STAGES:
        raise UserError(f"{where}: {recipe.stage} cannot be sharded; launch it with recipes/accelerate/ddp.yaml")
    model = getattr(recipe, "model", None)
    rows = None  # (new token rows?, tied embeddings?) of LoRA SFT with a template file; None: unknown
    lora_template = recipe.stage == "sft" and model is not None and model.lora is not None and model.chat_template
    if lora_template:
        rows = template_rows(model)
    if lora_template and kind == "ZeRO-3" and (rows is None or rows[0]):
        if cuda is None:
            cuda = torch.cuda.is_available()
        # peft/tuners/trainable_tokens/layer.py (_collect_token_weights): "right now, only CUDA is implemented"
        if not cuda:
            which = f"{model.path} lacks" if rows else f"only a local copy of {model.path} tells whether it lacks"
            raise UserError(f"{where} without a GPU: LoRA with new chat tokens ({which} the template's tokens): peft "
                            "builds the new rows under ZeRO-3 on CUDA only; use recipes/accelerate/zero2.yaml or "
                            "ddp.yaml, or start from a model that has the tokens (an SFT run)")
    if kind != "FSDP":
        return
    if lora_template and (rows is None or all(rows)):
        which = f"{model.path} is one" if rows else f"only a local copy of {model.path} tells whether it is one"
        raise UserError(f"{where}: LoRA with new chat tokens fails under FSDP2 on a model with tied input and output "
                        f"embeddings (GPT-2's are; {which}): peft trains the new rows as one delta both share, and "
                        "accelerate shards the two apart, which torch refuses; use recipes/accelerate/ddp.yaml, or "
                        "full fine-tuning under FSDP")
    # accelerate/utils/launch.py passes fsdp_transformer_layer_cls_to_wrap as this variable; a class the
    # model lacks fails in every process after the model has loaded (FullyShardedDataParallelPlugin).
    layers = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if layers and os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() == "TRANSFORMER_BASED_WRAP":
        check_layer_classes(recipe, layers, where)


def check_layer_classes(recipe, names: str, where: str) -> None:
    """Refuse an FSDP wrap class (comma-separated `names`) that the recipe's model does not define."""
    from posttrain.errors import UserError

    missing = _missing_layer_classes(recipe, names)
    if missing:
        raise UserError(f"{where}: fsdp_transformer_layer_cls_to_wrap {', '.join(missing)} is not a layer of a "
                        f"{next(iter(missing.values()))} model; name its decoder block (for GPT-2: GPT2Block)")


def _missing_layer_classes(recipe, names: str) -> dict[str, str]:
    """{class name: model type} for wrap classes the recipe's model does not define. Only checked
    when the architecture is known without a download: a local model directory, or pretrain's GPT-2."""
    model = getattr(recipe, "model", None)
    if model is None:
        return {}
    model_type = None
    if model.path is None:  # pretrain from model.config: a GPT-2
        model_type = "gpt2"
    elif (Path(model.path) / "config.json").is_file():
        model_type = json.loads((Path(model.path) / "config.json").read_text()).get("model_type")
    if not model_type:
        return {}
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return {}
    return {name: model_type for name in (n.strip() for n in names.split(",")) if name and not hasattr(module, name)}


def template_rows(model) -> tuple[bool, bool] | None:
    """(whether the recipe's chat template, `model.chat_template`, adds token rows; whether the
    model's input and output embeddings are tied), or None when that cannot be told from files on
    this machine (a model directory, or the Hugging Face cache), without downloading."""
    from transformers import AutoConfig, AutoTokenizer

    from posttrain.models import adapter_base, attach_chat_template, is_adapter

    remote = model.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, local_files_only=True, trust_remote_code=remote)
        base = adapter_base(model.path) if is_adapter(model.path) else model.path
        config = AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=remote)
    except (OSError, ValueError):
        return None
    return bool(attach_chat_template(None, tokenizer, model.chat_template)), bool(getattr(config, "tie_word_embeddings", True))


def is_sharded(trainer) -> bool:
    """Whether the trainer trains through FSDP or DeepSpeed (ZeRO-2 keeps whole weights on every
    process but wraps them in an engine whose saving and stepping every process must join)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (it costs no memory), taken before
    FSDP or ZeRO-3 shards the model in place: the structure (a peft model, a classification head, tied
    embeddings, as the stage built it) that `unshard` fills with the gathered weights on rank 0.
    Buffers are copied as they are (some are not in the state dict). Forwards that trainers patch
    onto instances are dropped: the copy runs its classes' own forward."""
    meta = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    copy_ = copy.deepcopy(model, meta)  # a parameter found in the memo is not copied again
    for module in copy_.modules():
        module.__dict__.pop("forward", None)
    return copy_


def fill(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give `skeleton(...)`'s meta parameters the gathered full `state` (each in the dtype it was
    built with), keeping tied parameters tied; persistent buffers are taken from `state` as well."""
    made: dict[int, nn.Parameter] = {}
    keys = set(state)
    for prefix, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if key not in state and id(p) not in made:  # a tied parameter may be gathered under one name
                raise RuntimeError(f"the gathered state has no {key}")
            keys.discard(key)
            if id(p) not in made:
                made[id(p)] = nn.Parameter(state[key].to(p.dtype), requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            key = f"{prefix}.{name}" if prefix else name
            if b is not None and key in state:
                module._buffers[name] = state[key].to(b.dtype)
                keys.discard(key)
    if keys:
        raise RuntimeError(f"the gathered state has entries the model lacks: {sorted(keys)[:3]}")
    return model


def unsharded_class(module: nn.Module) -> type:
    """A module's own class: fully_shard swaps it for a subclass named FSDP<Class>."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return next(b for b in cls.__bases__ if b is not FSDPModule) if issubclass(cls, FSDPModule) else cls


def fsdp_modules(model: nn.Module) -> dict[str, int]:
    """How finely FSDP2 cut `model` (each decoder block, embeddings and head, the root), by class."""
    from torch.distributed.fsdp import FSDPModule

    cut = Counter(unsharded_class(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
    return dict(sorted(cut.items()))


def unshard(trainer, run) -> bool:
    """End of training, on every process: record the training state each process held, and under
    FSDP or DeepSpeed give rank 0 the whole trained model as `trainer.model`, so that the stage finishes there as
    an unsharded run does (evaluation, `trainer.save_model`, merging a LoRA adapter). Every process
    joins in gathering the full weights; rank 0 puts them into the skeleton `build_trainer` took
    before sharding, so a full model and a peft model come back alike, without a trip through disk.
    Returns whether the model was sharded (then any other model the trainer sharded, such as DPO's
    frozen reference, is still sharded on rank 0)."""
    memory = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingState)), None)
    if getattr(trainer, "is_deepspeed_enabled", False):
        memory = None  # DeepSpeed keeps gradients and an fp32 master copy in its own flat buffers, unseen here
    held = per_process_bytes(trainer, memory) if memory is not None else None
    if held is not None:
        run.facts["training_state_bytes"] = held  # the process holding the most
    if not is_sharded(trainer):
        return False
    if trainer.is_fsdp_enabled:
        run.facts["fsdp_modules"] = fsdp_modules(trainer.model)
        state = trainer.accelerator.get_state_dict(trainer.model)  # every process joins; rank 0 gets it all, on the CPU
    else:  # DeepSpeed: ZeRO-3 gathers (every process joins; zero3_save_16bit_model), ZeRO-2 has it all already
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        # transformers reads ZeRO-3 from one global: with it set, generate() waits on every process at
        # each token (synced_gpus) and from_pretrained() partitions what it loads; rank 0 now goes on alone
        unset_hf_deepspeed_config()
    trainer.accelerator.wait_for_everyone()
    if not run.is_main:
        return True
    model = fill(trainer.posttrain_skeleton, state).to(trainer.args.device)
    del trainer.posttrain_skeleton
    trainer.model = trainer.model_wrapped = model
    # what is left (evaluate on rank 0, save_model) runs as without sharding
    trainer.is_fsdp_enabled = trainer.is_deepspeed_enabled = False
    return True


class TrainingState(TrainerCallback):
    """Bytes of parameters, gradients and optimizer state this process holds (its shards under FSDP),
    taken once, right after the first optimizer step, when all three exist."""

    def __init__(self):
        self.bytes: dict[str, int] | None = None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if self.bytes is None and model is not None:
            self.bytes = state_bytes(model, optimizer)


def state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this process's shard
        return t.numel() * t.element_size()

    params = list(model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    states = inner.state.values() if inner is not None else ()
    return {"params": sum(size(p) for p in params),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for st in states for v in st.values() if torch.is_tensor(v) and v.dim() > 0)}


def per_process_bytes(trainer, memory: TrainingState) -> dict | None:
    """Every process's TrainingState, gathered on rank 0: {params, grads, optimizer, total} of the
    process holding the most (None elsewhere). Every process must call it."""
    from accelerate.utils import gather_object

    rows = gather_object([memory.bytes or {}]) if trainer.accelerator.num_processes > 1 else [memory.bytes or {}]
    if not trainer.accelerator.is_main_process or not rows[0]:
        return None
    top = max(rows, key=lambda r: sum(r.values()))
    return {**top, "total": sum(top.values()), "processes": len(rows)}
