"""Sharded training (FSDP2) for the Trainer stages: where the weights are sharded, how a stage gets
its whole model back at the end, and how much training state each process holds.

A stage trains sharded on every process, then finishes (evaluates, saves) on rank 0 alone, as it
does unsharded. `unshard` is the bridge: every process joins in gathering the full weights,
rank 0 writes them once as an ordinary Hugging Face directory and loads that back as a plain model,
which becomes `trainer.model` for the rest of the stage (evaluation, saving). Evaluation thus runs on rank 0 from the saved
weights: the same evaluation code and cost as an unsharded run, the sharded model's weights exactly.

On a machine without a GPU accelerate never takes the FSDP path: `AcceleratorState.__init__`
(accelerate/state.py) turns an FSDP launch into FSDP only for GPU-like process groups and leaves a
CPU one (MULTI_CPU, gloo) as plain data parallel, silently. `fsdp_on_cpu` sets the distributed type
that branch would have set, and nothing else; everything after it (accelerate's fsdp2_prepare_model,
which calls torch's fully_shard, its full-state-dict gathering, the Trainer's FSDP save and
checkpoint code) is the code a GPU run executes. torch's FSDP2 itself supports CPU over gloo.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn
from transformers import TrainerCallback


def fsdp_launch() -> bool:
    """Whether this process was launched with an FSDP accelerate config (the launcher sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


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


# Stages whose end gathers through unshard(); the others generate while they train.
FSDP_STAGES = ("pretrain", "sft", "classify", "reward", "dpo")


def check_stage(recipe) -> None:
    """Refuse, in one line, what FSDP cannot take in posttrain (yet), before any model loads."""
    from posttrain.errors import UserError

    where = f"{recipe.stage} under FSDP"
    if recipe.stage not in FSDP_STAGES:
        raise UserError(f"{where}: {recipe.stage} generates answers while it trains, with the whole policy on every "
                        "process, which FSDP shards; launch it with recipes/accelerate/ddp.yaml")
    model = getattr(recipe, "model", None)
    lora = model is not None and model.lora is not None
    if lora or getattr(getattr(recipe, "classify", None), "trainable", None) == "lora":
        raise UserError(f"{where} with LoRA: not supported yet (the adapter is not gathered back into a loadable run "
                        "directory); a LoRA run's trainable state is small, so launch it with recipes/accelerate/ddp.yaml")
    # accelerate/utils/launch.py passes fsdp_transformer_layer_cls_to_wrap as this variable; a class the
    # model lacks fails in every process after the model has loaded (FullyShardedDataParallelPlugin).
    layers = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if layers and os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() == "TRANSFORMER_BASED_WRAP":
        from posttrain.launch_rules import check_layer_classes

        check_layer_classes(recipe, layers, where)


def is_sharded(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def unsharded_class(model: nn.Module) -> type:
    """The model's own class: fully_shard swaps it for a subclass named FSDP<Class>."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def unshard(trainer, run) -> bool:
    """End of training, on every process: record the training state each process held, and under
    FSDP give rank 0 the whole trained model as `trainer.model`, so that the stage finishes there as
    an unsharded run does (evaluation, `trainer.save_model`, merging). The full weights are gathered
    (every process joins), written once by rank 0 to a staging directory in the run directory with
    `trainer.save_model`, loaded back as a plain model of the same class, and the staging removed.
    Returns whether the model was sharded (then any other model the trainer sharded, such as DPO's
    frozen reference, is still sharded on rank 0)."""
    memory = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingState)), None)
    held = per_process_bytes(trainer, memory) if memory is not None else None
    if held is not None:
        run.facts["training_state_bytes"] = held  # the process holding the most
    if not is_sharded(trainer):
        return False
    staging = run.dir / ".gathered"
    trainer.save_model(str(staging))  # every process joins the gather; rank 0 writes (FULL_STATE_DICT)
    trainer.accelerator.wait_for_everyone()
    if not run.is_main:
        return True
    dtype = next(trainer.model.parameters()).dtype
    model = unsharded_class(trainer.model).from_pretrained(str(staging), dtype=dtype)
    shutil.rmtree(staging)
    trainer.model = trainer.model_wrapped = model
    trainer.is_fsdp_enabled = False  # what is left (evaluate on rank 0, save_model) runs as without FSDP
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
