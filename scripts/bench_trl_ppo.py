"""Baseline for the PPO speed benchmark: TRL's PPOTrainer, timed per iteration.

    /tmp/trlv/bin/python scripts/bench_trl_ppo.py --policy runs/world/sft --reward runs/world/reward \\
        --prompts prompts.json --iterations 3 --rollout-batch 8 --minibatch 4 --epochs 2 \\
        --response-length 16 --stop-token-id 1843 --out /tmp/trlppo

One iteration is one rollout batch (generation, reference/value/reward forwards, GAE) plus its PPO
epochs. The script writes OUT/trl_ppo.json (seconds per iteration, train wall, scores, KL, settings)
and saves the trained policy with its tokenizer to OUT/policy.

It runs in a virtual environment of its own (torch, transformers 5, TRL 1.12.0) and imports nothing
from posttrain: TRL 1.12 is the last release that ships PPOTrainer (as trl.experimental.ppo), while
posttrain needs TRL 1.16, so the two cannot share an environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import trl
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer


class IterationTimer(TrainerCallback):
    """Wall time of each PPO iteration plus the metrics TRL logs for it.

    PPOTrainer.train runs its own loop, not Trainer's: it calls on_train_begin once, then per
    iteration self.log(metrics) (-> on_log) followed by on_step_end, so on_step_end marks the end
    of one rollout batch and all its PPO epochs.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.logs: list[dict[str, float]] = []
        self._last = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._last = time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs is not None and "objective/scores" in logs:
            self.logs.append(dict(logs))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, type=Path, help="SFT causal-LM dir (policy and reference)")
    p.add_argument(
        "--reward", required=True, type=Path, help="sequence-classification dir, num_labels=1 (reward, value)"
    )
    p.add_argument("--prompts", required=True, type=Path, help="JSON list of prompts, each a list of token ids")
    p.add_argument("--iterations", required=True, type=int)
    p.add_argument("--rollout-batch", required=True, type=int)
    p.add_argument("--minibatch", required=True, type=int)
    p.add_argument("--epochs", required=True, type=int)
    p.add_argument("--response-length", required=True, type=int)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--missing-eos-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-token-id", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.rollout_batch % args.minibatch:
        p.error(f"--rollout-batch {args.rollout_batch} is not a multiple of --minibatch {args.minibatch}")
    return args


def load_prompts(path: Path, count: int) -> list[list[int]]:
    prompts = json.loads(path.read_text())
    if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
        raise ValueError(f"{path}: expected a non-empty JSON list of non-empty lists of token ids")
    # Cycle a short list so every iteration gets a full rollout batch.
    return [prompts[i % len(prompts)] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(a.seed)

    tok = AutoTokenizer.from_pretrained(a.policy)
    if tok.pad_token_id is None or tok.pad_token_id == a.stop_token_id:
        # TRL derives every attention mask and sequence end from `== pad_token_id`.
        raise ValueError(f"pad_token_id {tok.pad_token_id} must exist and differ from the stop token {a.stop_token_id}")
    if tok.eos_token_id != a.stop_token_id:
        print(
            f"warning: stop token {a.stop_token_id} != tokenizer eos {tok.eos_token_id}; TRL truncates at the stop token "
            "but applies missing_eos_penalty by looking for the tokenizer's eos"
        )
    saved_padding_side = tok.padding_side
    # TRL's collator pads the queries and generation continues after the last query column, so
    # prompts must be left-padded; right padding would put pad tokens between prompt and response.
    tok.padding_side = "left"

    n_prompts = a.iterations * a.rollout_batch
    train_dataset = datasets.Dataset.from_dict({"input_ids": load_prompts(a.prompts, n_prompts)})

    def causal_lm() -> transformers.PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)

    def scorer() -> transformers.PreTrainedModel:
        return AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)

    policy, ref_policy = causal_lm(), causal_lm()
    reward_model, value_model = scorer(), scorer()
    # PPOTrainer overwrites policy.generation_config.eos_token_id with the stop token; the saved
    # policy should keep the SFT model's own generation settings.
    original_generation_config = copy.deepcopy(policy.generation_config)

    config = PPOConfig(
        output_dir=str(a.out / "trl_trainer"),
        per_device_train_batch_size=a.rollout_batch,
        gradient_accumulation_steps=1,
        num_mini_batches=a.rollout_batch // a.minibatch,
        local_rollout_forward_batch_size=a.minibatch,
        total_episodes=n_prompts,
        num_ppo_epochs=a.epochs,
        response_length=a.response_length,
        temperature=a.temperature,
        kl_coef=a.kl_coef,
        learning_rate=a.lr,
        missing_eos_penalty=a.missing_eos_penalty,
        stop_token_id=a.stop_token_id,
        seed=a.seed,
        sft_model_path=str(a.policy),
        reward_model_path=str(a.reward),
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        # TRL's base config defaults gradient_checkpointing to True; PPOTrainer never enables it, but
        # say so explicitly, under transformers 5's name (the old one only raises a FutureWarning).
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    timer = IterationTimer()
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        callbacks=[timer],
    )

    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    trained.generation_config = original_generation_config
    trained.save_pretrained(a.out / "policy")
    tok.padding_side = saved_padding_side
    tok.save_pretrained(a.out / "policy")

    result = {
        "iterations": a.iterations,
        "seconds_per_iteration": timer.seconds,
        "train_seconds": train_seconds,
        "scores": [log["objective/scores"] for log in timer.logs],
        "kl": [log["objective/kl"] for log in timer.logs],
        "trl_version": trl.__version__,
        # Everything TRL logged per iteration; its objective/scores already include missing_eos_penalty.
        "logs": timer.logs,
        "settings": {
            "policy": str(a.policy),
            "reward": str(a.reward),
            "prompts": str(a.prompts),
            "n_prompts_in_file": len(json.loads(a.prompts.read_text())),
            "iterations": a.iterations,
            "rollout_batch": a.rollout_batch,
            "minibatch": a.minibatch,
            "num_mini_batches": config.num_mini_batches,
            "local_rollout_forward_batch_size": config.local_rollout_forward_batch_size,
            "total_episodes": config.total_episodes,
            # PPOTrainer's DataLoader shuffles (seeded): each prompt is used once, not in file order.
            "dataloader_shuffle": True,
            "num_ppo_epochs": a.epochs,
            "response_length": a.response_length,
            "temperature": a.temperature,
            "kl_coef": a.kl_coef,
            "kl_estimator": config.kl_estimator,
            "learning_rate": a.lr,
            "lr_scheduler_type": getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type),
            "missing_eos_penalty": a.missing_eos_penalty,
            "stop_token_id": a.stop_token_id,
            "pad_token_id": tok.pad_token_id,
            "cliprange": config.cliprange,
            "cliprange_value": config.cliprange_value,
            "vf_coef": config.vf_coef,
            "gamma": config.gamma,
            "lam": config.lam,
            "whiten_rewards": config.whiten_rewards,
            "seed": a.seed,
            "device": str(trainer.accelerator.device),
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "datasets": datasets.__version__,
                "trl": trl.__version__,
            },
        },
    }
    (a.out / "trl_ppo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
