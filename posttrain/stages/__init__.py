"""The stages, registered once. The CLI (one subcommand each), the recipe loader (which schema a
`stage:` name means), the launch rules, scripts/compare_processes.py and the tests read this table;
a test checks that the Makefile's targets and their prerequisites agree with it.

A stage is a module `posttrain/stages/<name>.py` with one function, `main(recipe, force) -> Path`,
that reads top to bottom: load what the recipe names (models through `models.load_start_model`),
claim the run directory (`Run(recipe).start(force)`), train, measure, and `run.finish(...)`, which
saves the model, draws the curves, writes summary.json, the model card and DONE, last. Whether a
finished run makes the stage unnecessary is decided by the CLI before the module is even imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.recipe import (
    ClassifyRecipe,
    DpoRecipe,
    GrpoRecipe,
    PpoRecipe,
    PretrainRecipe,
    Recipe,
    RewardRecipe,
    SftRecipe,
    WorldRecipe,
)


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: type[Recipe]
    help: str  # one line, for `posttrain --help`
    description: str  # for `posttrain STAGE --help`
    world_recipe: str  # recipes/world/<this>.yaml, run by `make <its stem>`
    needs: tuple[str, ...] = ()  # stages whose runs the world recipe reads (make runs them first)
    trainer: bool = False  # built on the Hugging Face Trainer (posttrain/training.py trainer_kwargs)
    trl_peft: bool = False  # hands a peft config to a TRL trainer (LoRA wrapped by TRL, not by us)

    @property
    def module(self) -> str:
        return f"posttrain.stages.{self.name}"


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("world", WorldRecipe, "generate the built-in world's datasets",
          "Generate the built-in world from a seed: people and facts, the pretraining corpus, chat SFT data "
          "(held-out people excluded), classification data, preference pairs, PPO and evaluation prompts. "
          "The same recipe always gives byte-identical files. Default recipe: recipes/world/world.yaml.",
          world_recipe="recipes/world/world.yaml"),
    Stage("pretrain", PretrainRecipe, "pretrain a GPT-2 from scratch (the world's base model)",
          "Train a byte-level BPE tokenizer (or load one) and a GPT-2 from scratch on a text corpus. Saves a "
          "standard Hugging Face model directory and reports the loss and, given probe prompts, how many facts "
          "the model completes correctly (fact_recall in summary.json).",
          world_recipe="recipes/world/base.yaml", needs=("world",), trainer=True),
    Stage("sft", SftRecipe, "supervised fine-tuning with a chat template and loss masking",
          "Fine-tune a causal LM on chats (messages), prompt/completion pairs, Alpaca records or plain text with TRL's "
          "SFTTrainer. The model keeps its own chat template, or model.chat_template names one (from data_templates/: its "
          "special tokens are added and the embedding resized); the loss covers only what the model should learn to say "
          "(assistant turns and their end-of-turn token, found from any template, or completions), packing is "
          "padding-free, and model.lora switches to LoRA. At the end it answers the eval prompts and, with the world's "
          "verifier, reports format, gold metrics and held-out fact retention.",
          world_recipe="recipes/world/sft.yaml", needs=("pretrain",), trainer=True, trl_peft=True),
    Stage("classify", ClassifyRecipe, "fine-tune a GPT as a text classifier",
          "Put a classification head on the hidden state of the last real token of a pretrained GPT and "
          "fine-tune it on text + label data (JSONL/CSV/TSV). classify.trainable picks what learns: head, "
          "last_blocks:N, lora or all. Reports accuracy, macro-F1, per-class precision/recall and a confusion "
          "matrix on the test split, and the untrained head's accuracy for reference.",
          world_recipe="recipes/world/classify.yaml", needs=("pretrain",), trainer=True),
    Stage("reward", RewardRecipe, "train a reward model on preference pairs",
          "Train a scalar reward model (a sequence-classification head on the last real token) on prompt/chosen/"
          "rejected pairs with TRL's RewardTrainer, starting from a chat model. Reports held-out pairwise accuracy "
          "and margins, a score histogram, and on the world how often it ranks fresh answers like the gold verifier.",
          world_recipe="recipes/world/reward.yaml", needs=("sft",), trainer=True, trl_peft=True),
    Stage("dpo", DpoRecipe, "direct preference optimisation of a chat model",
          "Align a chat model on preference pairs with TRL's DPOTrainer (beta, loss_type sigmoid/ipo/hinge/...). The "
          "reference is the starting model (with LoRA, the same model with adapters off; or precomputed log-probs). "
          "Reports held-out preference accuracy and margins, the KL of the new policy to the reference on eval "
          "prompts, and on the world the gold-verifier metrics before and after.",
          world_recipe="recipes/world/dpo.yaml", needs=("sft",), trainer=True, trl_peft=True),
    Stage("ppo", PpoRecipe, "RLHF with PPO against a reward model and/or the gold verifier",
          "Optimise a chat model with PPO (posttrain/ppo.py: rollouts, KL-shaped rewards, GAE, clipped policy and "
          "value losses, adaptive KL). The reward is a learned reward model, the world's gold verifier, or a weighted "
          "sum; both are logged every iteration, and a monitor flags reward hacking (proxy up while gold falls). "
          "Works under `accelerate launch` with several processes.",
          world_recipe="recipes/world/ppo.yaml", needs=("sft", "reward")),
    Stage("grpo", GrpoRecipe, "group-relative RL (GRPO or RLOO) on verifiable rewards",
          "Optimise a chat model with TRL's GRPOTrainer (grpo.algorithm: grpo; loss_type grpo/dr_grpo/dapo/bnpo) or "
          "RLOOTrainer (rloo): num_generations answers per prompt, each judged against its group. Rewards are named in "
          "the recipe and weighted: the world's gold verifier, a reward model run, or verifiable checks on a prompt "
          "field (final_number, exact, choice) and format. Every reward, the share of groups with no signal (all "
          "answers scored alike), KL, clipping and length are logged; the hacking monitor watches proxy vs gold.",
          world_recipe="recipes/world/grpo.yaml", needs=("sft",), trainer=True, trl_peft=True),
)}
