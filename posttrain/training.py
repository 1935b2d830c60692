"""What every Trainer-based stage shares: arguments from the recipe, logging into the run directory,
a progress display, checkpoints that appear atomically, and resume.

Stages built on the Hugging Face `Trainer` or a TRL trainer (pretrain, classify, sft, reward, dpo)
call `trainer_kwargs()` for their config, wrap their trainer class with `atomic_checkpoints()`, and
run it with `fit()`. PPO has its own loop and uses the same Run for logging and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from posttrain.errors import UserError
from posttrain.recipe import Recipe
from posttrain.runs import EXTRA_STATE_FILE, Run, check_processes, publish
from posttrain.sharding import deepspeed_launch


def use_bf16(recipe_dtype: str) -> bool:
    """bf16 only where the hardware does it well; fp32 on CPU (bf16 matmul is ~200x slower there)."""
    if recipe_dtype == "bfloat16":
        return True
    if recipe_dtype in ("float32", "float16"):
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def trainer_kwargs(recipe: Recipe, run: Run, **extra) -> dict:
    """Keyword arguments for `TrainingArguments` or any TRL config, from the shared recipe sections."""
    t = recipe.train
    model = getattr(recipe, "model", None)
    dtype = model.dtype if model is not None else "auto"
    kwargs = dict(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # torch's fused AdamW: one kernel for every parameter; on a CPU the default (a loop over tensors)
        # took 3-4 ms of a 110 ms world SFT step, the fused one 0.8 ms (make bench)
        optim="adamw_torch_fused",
        adam_beta2=t.adam_beta2,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=use_bf16(dtype),
        fp16=dtype == "float16",
        logging_steps=recipe.logging.every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.keep_checkpoints,
        eval_strategy="steps" if t.eval_every else "no",
        eval_steps=t.eval_every,
        report_to=[],  # metrics go to the run directory (metrics.jsonl + TensorBoard) by MetricsCallback
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=bool(model is not None and model.gradient_checkpointing),
        # Without CUDA the Trainer joins the launcher's process group (gloo) only when asked for the
        # CPU (transformers/training_args.py _setup_devices); otherwise each process trains alone.
        # A DeepSpeed launch must not ask for the CPU: accelerate would drop DeepSpeed (posttrain/sharding.py
        # deepspeed_on_cpu joins its process group instead).
        use_cpu=not torch.cuda.is_available() and not deepspeed_launch(),
    )
    kwargs.update(extra)
    return kwargs


class MetricsCallback(TrainerCallback):
    """Forward the Trainer's logs to the run directory and draw progress."""

    def __init__(self, run: Run, total_steps: int | None = None):
        self.run = run
        self.progress = Progress(total_steps)

    def on_train_begin(self, args, state, control, **kw):
        self.progress.start(state.max_steps, state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        for key in ("loss", "grad_norm", "eval_loss"):  # every process logs the same (gathered) values
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"train: {key} became {value} at step {state.global_step}: the run diverged and stopped "
                                "without DONE; lower train.lr (or raise train.warmup), then run it again with --force")
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if logs:
            self.run.log(state.global_step, logs)
            self.progress.note(logs)

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(state.global_step)

    def on_train_end(self, args, state, control, **kw):
        self.progress.stop()


class Progress:
    """A live bar on a terminal; on a pipe or in CI, one line roughly every 5% of the run."""

    def __init__(self, total: int | None = None, label: str = "train"):
        self.total, self.label = total, label
        self.tty = sys.stdout.isatty()
        self.last: dict = {}
        self._bar = None
        self._t0 = time.time()
        self._step0 = 0
        self._next_print = 0

    def start(self, total: int, step: int = 0) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        self.total, self._step0, self._t0 = total, step, time.time()
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total, completed=step, info="")

    def note(self, logs: dict) -> None:
        self.last.update(logs)

    def info(self) -> str:
        keys = [k for k in ("loss", "eval_loss", "learning_rate", "reward", "gold", "kl") if k in self.last]
        return "  ".join(f"{k.replace('learning_rate', 'lr')} {self.last[k]:.4g}" for k in keys)

    def update(self, step: int) -> None:
        if int(os.environ.get("RANK", "0")) != 0 or not self.total:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self.info())
        elif step >= self._next_print or step == self.total:
            done = step - self._step0
            rate = done / max(time.time() - self._t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else 0
            print(f"{self.label} step {step}/{self.total}  {self.info()}  eta {eta:.0f}s", flush=True)
            self._next_print = step + max(1, self.total // 20)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# What a Hugging Face checkpoint lacks for a resumed run to log what an uninterrupted one logs: the
# loss summed so far (the Trainer's train_loss averages only the steps since it started) and TRL's
# running token count (num_tokens), and a stage's own counts (`extra_state`, e.g. SFT's padding).
# Saved beside the checkpoint (posttrain/runs.py EXTRA_STATE_FILE), read back by fit().


def atomic_checkpoints(trainer_cls: type) -> type:
    """A subclass of `trainer_cls` whose checkpoints are written into a staging directory and renamed
    into place when complete, so a run killed mid-save never leaves a half checkpoint to resume from."""

    class Atomic(trainer_cls):
        loss_before_resume = 0.0  # the summed logged loss of the steps before the checkpoint resumed
        resumed = False  # even when that sum is 0 (GRPO's first steps can all be 0) the average needs fixing

        def _save_checkpoint(self, model, trial):
            root = self.args.output_dir
            staging = os.path.join(root, ".staging")
            name = f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = root
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                # loss not yet logged (a checkpoint between two logging steps) counts as this process's
                unlogged = float(getattr(self, "_tr_loss", 0.0))
                extra = {"total_loss": self.loss_before_resume + getattr(self, "_total_loss_scalar", 0.0) + unlogged,
                         "total_train_tokens": getattr(self, "_total_train_tokens", None),
                         "processes": self.accelerator.num_processes,
                         "trainer": getattr(self, "extra_state", None)}  # a stage's own running counts
                with open(os.path.join(staging, name, EXTRA_STATE_FILE), "w") as f:
                    json.dump(extra, f)
                publish(Path(staging) / name, Path(root) / name)
                rotate_checkpoints(output_dir=root, save_total_limit=self.args.save_total_limit, use_mtime=False)
            self.accelerator.wait_for_everyone()

        def log(self, logs, *args, **kwargs):
            if "train_loss" in logs and self.resumed:  # the end of a resumed run: average every step
                logs["train_loss"] = (self.loss_before_resume + self._total_loss_scalar) / max(self.state.global_step, 1)
            super().log(logs, *args, **kwargs)

    Atomic.__name__ = Atomic.__qualname__ = trainer_cls.__name__
    return Atomic


def build_trainer(trainer_cls: type, run: Run, **kwargs):
    """`trainer_cls(**kwargs)` with atomic checkpoints, logging into `run`, and our progress display
    instead of the Trainer's printed dicts."""
    from posttrain.sharding import TrainingState, is_sharded, skeleton

    kwargs["callbacks"] = [*kwargs.get("callbacks", []), MetricsCallback(run), TrainingState()]
    trainer = atomic_checkpoints(trainer_cls)(**kwargs)
    if is_sharded(trainer) and trainer.accelerator.is_main_process:
        # FSDP and ZeRO-3 shard the model in place when training starts; rank 0 keeps its structure to finish on
        trainer.posttrain_skeleton = skeleton(trainer.model)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def fit(trainer, run: Run) -> dict:
    """Train, resuming from the run's last complete checkpoint if there is one. Returns train metrics."""
    ckpt = run.rewind()
    if ckpt is not None and (ckpt / EXTRA_STATE_FILE).exists():
        check_processes(ckpt, trainer.accelerator.num_processes)  # the CLI checked already; a direct caller may not
        extra = json.loads((ckpt / EXTRA_STATE_FILE).read_text())
        trainer.loss_before_resume, trainer.resumed = extra["total_loss"], True
        if extra.get("total_train_tokens") is not None:
            trainer._total_train_tokens = extra["total_train_tokens"]
        if extra.get("trainer") is not None:
            trainer.extra_state = extra["trainer"]
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    return dict(out.metrics)
