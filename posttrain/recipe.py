"""The recipe schema: one YAML file per stage, every setting defined here once, with its default and range.

A recipe has the sections every stage shares (`model`, `data`, `train`, `output_dir`, `seed`,
`logging`) and one section named after its stage (`pretrain:`, `sft:`, ...) for what only that stage
reads. Reading a file (YAML, `--set` overrides, one-line errors) is posttrain/recipe_file.py; checking
that the paths it names exist is posttrain/inputs.py; which recipe class belongs to which stage is the
stage registry, posttrain/stages/__init__.py.

Paths in a recipe are relative to the directory you run `posttrain` from (the repository root when
you use `make`).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.world.facts import FIRST_NAMES


class Section(BaseModel):
    # Unknown keys are typos; inf and nan are never a setting (`lr: .inf` trains to NaN weights).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- shared sections -------------------------------------------------------------------------------


class LoraConfig(Section):
    """LoRA adapters (peft). Omit `model.lora` for full fine-tuning."""

    r: int = Field(16, gt=0, le=65536)  # at most the layer width too, checked against a local model's config
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class GPTConfig(Section):
    """A GPT-2 architecture, for training from scratch (`pretrain` only)."""

    n_layer: int = Field(4, gt=0)
    n_embd: int = Field(256, gt=0)
    n_head: int = Field(4, gt=0)
    n_inner: int | None = Field(None, gt=0)  # MLP width; None is GPT-2's 4 x n_embd
    # GPT-2's tanh-approximated GELU. gelu_pytorch_tanh is the same function as GPT-2's gelu_new in
    # one fused kernel (~7% faster training steps on a CPU); both load with any transformers.
    activation: Literal["gelu_pytorch_tanh", "gelu_new", "gelu", "relu"] = "gelu_pytorch_tanh"
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ModelSection(Section):
    path: str | None = None  # hub id, local HF dir, run dir, or nanoGPT .pt
    config: GPTConfig | None = None  # architecture when training from scratch
    chat_template: str | None = None  # a Jinja file, e.g. data_templates/chatml.jinja
    lora: LoraConfig | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 where supported
    gradient_checkpointing: bool = False


DataFormat = Literal["auto", "text", "classification", "messages", "prompt_completion", "alpaca", "preference", "prompts"]


class DataSection(Section):
    train: str  # local file (JSONL/JSON/CSV/TSV/Parquet) or hub dataset name
    eval: str | None = None
    format: DataFormat = "auto"
    max_length: int = Field(256, gt=0)
    limit: int | None = Field(None, gt=0)  # use only the first N training rows
    columns: list[str] | None = None  # column names for CSV/TSV files without a header row


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides epochs
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(8, gt=0)  # per process
    grad_accum: int = Field(1, gt=0)
    warmup: float = Field(0.0, ge=0)  # a fraction of the steps if < 1, else a number of steps
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # Adam's second-moment decay. 0.999 averages squared gradients over ~1000 steps: a reward model
    # whose early, easy pairs gave large gradients then takes that long to step at full size on
    # the hard ones; 0.95 (common for LLM training) adapts in ~20.
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    packing: bool = False  # SFT only
    eval_every: int | None = Field(None, gt=0)  # steps; default: once at the end
    save_every: int = Field(500, gt=0)  # checkpoint interval in steps, for resume
    keep_checkpoints: int = Field(2, gt=0)


class LoggingSection(Section):
    every: int = Field(10, gt=0)  # steps between metrics.jsonl lines
    tensorboard: bool = True


class PromptSet(Section):
    """Prompts to answer and how: what a stage's end-of-run evaluation (`eval:`) and a `compare` suite share."""

    prompts: str | None = None  # prompts file: `prompt` (+ gold fields for the verifier)
    verifier: str | None = None  # a world data directory (world.json): score answers with the gold verifier
    limit: int | None = Field(None, gt=0)  # only the first N prompts
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(64, gt=0)


class EvalSection(PromptSet):
    """Generation-based evaluation at the end of a stage."""

    probe: str | None = None  # raw-text fact probes: compare with the starting model's own recall
    show: int = Field(5, ge=0)  # sample answers printed at the end
    prompt_field: str = "prompt"  # the prompts file's column that holds the prompt (GSM8K: question)


class Suite(PromptSet):
    """A `posttrain compare` suite file (eval/*.yaml); posttrain/compare.py reads it."""

    prompts: str
    metrics: list[str] = ["stop", "length", "distinct", "reward", "kl"]  # groups of compare.TABLE rows
    samples: int = Field(1, ge=0)  # sampled answers per prompt at temperature 1 (kl needs at least 1)
    examples: int = Field(6, ge=0)  # side-by-side prompts in the report


class Recipe(Section):
    stage: str
    output_dir: str = Field(min_length=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range (data shuffling seeds numpy too)
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _one_eval_source(self) -> Recipe:
        section = getattr(self, self.stage, None)
        data = getattr(self, "data", None)
        if getattr(section, "eval_split", None) and data is not None and data.eval:
            raise ValueError(f"{self.stage}.eval_split: data.eval is given too; set one of them")
        return self

    @model_validator(mode="after")
    def _packing_is_sft_only(self) -> Recipe:
        train = getattr(self, "train", None)
        if train is not None and train.packing and self.stage != "sft":
            raise ValueError("train.packing: only the sft stage packs sequences; remove it")
        return self

    # Relative paths in the recipe that must exist before the stage can start (dotted keys).
    input_paths: ClassVar[tuple[str, ...]] = ()

    def paths(self) -> dict[str, str]:
        """{dotted key: path} for every input path the recipe sets."""
        out = {}
        for key in self.input_paths:
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part, None)
            if value:
                out[key] = value
        return out


# --- stages ------------------------------------------------------------------------------------------


class WorldSection(Section):
    people: int = Field(240, gt=0, le=len(FIRST_NAMES))  # everyone has a first name of their own
    heldout_fraction: float = Field(0.25, ge=0, lt=1)
    bios_per_person: int = Field(6, gt=0)
    skill_docs: int = Field(500, ge=0)
    general_docs: int = Field(150, ge=0)
    context_docs: int = Field(1000, ge=0)
    p_wrong: float = Field(0.08, ge=0, le=1)
    p_sycophant: float = Field(0.75, ge=0, le=1)
    p_ramble: float = Field(0.25, ge=0, le=1)
    p_hallucinate: float = Field(0.5, ge=0, le=1)
    p_rude: float = Field(0.08, ge=0, le=1)
    p_comply_harmful: float = Field(0.6, ge=0, le=1)
    p_refuse_benign: float = Field(0.05, ge=0, le=1)
    pref_pairs_per_person: int = Field(24, gt=0)
    pref_skill_pairs: int = Field(600, ge=0)


class WorldRecipe(Recipe):
    stage: Literal["world"]
    world: WorldSection = WorldSection()


class TokenizerSection(Section):
    path: str | None = None  # an existing tokenizer directory; default: train a byte-level BPE
    vocab_size: int = Field(4096, ge=300)  # for a trained BPE: an upper bound (small corpora stop earlier)
    min_frequency: int = Field(2, gt=0)


class PretrainSection(Section):
    tokenizer: TokenizerSection = TokenizerSection()
    probe: str | None = None  # raw-text fact probes (prompt, answer) scored at the end
    shuffle_epochs: int = Field(64, gt=0)  # distinct document shufflings cut into blocks


class PretrainRecipe(Recipe):
    stage: Literal["pretrain"]
    model: ModelSection = ModelSection(config=GPTConfig())
    data: DataSection
    train: TrainSection = TrainSection()
    pretrain: PretrainSection = PretrainSection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "data.eval", "model.path", "pretrain.tokenizer.path", "pretrain.probe")

    @model_validator(mode="after")
    def _model_source(self) -> PretrainRecipe:
        if (self.model.path is None) == (self.model.config is None):
            raise ValueError("model: set exactly one of model.config (train from scratch) or model.path (continue)")
        return self


class SftSection(Section):
    loss: Literal["auto", "assistant_only", "completion_only", "all"] = "auto"  # auto: by data format
    overlong: Literal["drop", "truncate"] = "drop"  # examples longer than data.max_length
    merge: bool = False  # with LoRA, also write a merged full model to OUTPUT_DIR/merged


class FineTuneRecipe(Recipe):
    """A stage that starts from an existing checkpoint (model.path)."""

    @model_validator(mode="after")
    def _needs_a_model(self) -> FineTuneRecipe:
        model = getattr(self, "model", None)
        if model is not None and not model.path:
            raise ValueError("model.path: this stage fine-tunes a checkpoint; set model.path (a run dir, HF dir or hub id)")
        if model is not None and model.config is not None:
            raise ValueError("model.config: only the pretrain stage builds a model from an architecture; remove it")
        return self


class SftRecipe(FineTuneRecipe):
    stage: Literal["sft"]
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    sft: SftSection = SftSection()
    eval: EvalSection = EvalSection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "data.eval", "model.path", "model.chat_template",
                                              "eval.prompts", "eval.verifier", "eval.probe")


class SplitSection(Section):
    """Carve validation/test sets out of data.train (seeded by the recipe's seed) when not given."""

    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)


class ClassifySection(Section):
    text_column: str = "text"
    label_column: str = "label"
    test: str | None = None  # a test file; default: carved from data.train by `split`
    split: SplitSection = SplitSection()
    trainable: str = "head"  # head | last_blocks:N | lora | all
    group_by_length: bool = False  # train batches of similar-length texts: less padding (faster), less mixed batches

    @model_validator(mode="after")
    def _trainable(self) -> ClassifySection:
        if not re.fullmatch(r"head|lora|all|last_blocks:[1-9][0-9]*", self.trainable):
            raise ValueError(f"trainable must be head, last_blocks:N, lora or all, not {self.trainable!r}")
        return self


class ClassifyRecipe(FineTuneRecipe):
    stage: Literal["classify"]
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    classify: ClassifySection = ClassifySection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "data.eval", "model.path", "classify.test")


class PairSection(Section):
    """What reward modelling and DPO share: preference pairs that must fit the context, and a held-out part."""

    overlong: Literal["drop", "truncate"] = "drop"  # pairs longer than data.max_length
    eval_split: float | None = Field(None, gt=0, lt=1)  # without data.eval: hold out this fraction of data.train (seeded)


class RewardSection(PairSection):
    center_rewards: float | None = Field(None, ge=0)  # weight of a penalty pulling mean rewards to 0
    gold_pairs: int = Field(200, ge=0)  # fresh answer pairs to rank with the RM and the gold verifier (world)
    policy: str | None = None  # which policy samples those pairs (default: model.path)
    extra_layers: int = Field(0, ge=0)  # identity-initialised GPT-2 blocks added on top (see models.add_blocks)


class RewardRecipe(FineTuneRecipe):
    stage: Literal["reward"]
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    reward: RewardSection = RewardSection()
    eval: EvalSection = EvalSection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "data.eval", "model.path", "eval.prompts", "eval.verifier",
                                              "reward.policy")


class DpoSection(PairSection):
    beta: float = Field(0.1, gt=0)  # strength of the implicit KL to the reference (higher: stay closer)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                       "apo_zero", "apo_down"] = "sigmoid"
    # RPO (Pang et al. 2024): add this weight times the NLL of the chosen answers, which keeps DPO from
    # lowering the probability of both answers (likelihood displacement); 0 is plain DPO.
    sft_weight: float = Field(0.0, ge=0)
    precompute_ref: bool = False  # compute the reference log-probs once up front (no reference model in training)


class DpoRecipe(FineTuneRecipe):
    stage: Literal["dpo"]
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    dpo: DpoSection = DpoSection()
    eval: EvalSection = EvalSection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "data.eval", "model.path", "eval.prompts", "eval.verifier")


class MonitorSection(Section):
    """The reward-hacking alarm (posttrain/monitor.py detect_reward_hacking reads these, defaults included)."""

    window: int = Field(5, gt=0)  # iterations per smoothing window
    min_proxy_rise: float = Field(0.1, ge=0)  # in reward-model standard deviations
    # In gold score (0..1). A 5-iteration window of 32 rollouts has a standard error near 0.035, so two
    # windows differ by ~0.05 by chance; at 0.02 a run that ends +0.06 above SFT was flagged on noise.
    min_gold_drop: float = Field(0.05, ge=0)
    max_corr: float = Field(-0.5, ge=-1, le=1)  # or gold merely slides while proxy and gold anti-correlate this much
    patience: int = Field(2, gt=0)


class PpoKnobs(Section):
    """What the PPO loop itself reads (posttrain/ppo.py, steps 1-7 of its docstring). PPOConfig there is
    these plus the optimiser settings a recipe keeps in `train:` (lr, adam_beta2, max_grad_norm) and `seed`."""

    rollout_batch_size: int = Field(32, gt=0)  # prompts (= answers) per process per iteration
    minibatch_size: int = Field(8, gt=0)  # sequences per optimizer step per process
    ppo_epochs: int = Field(2, gt=0)  # passes over each rollout
    clip_range: float = Field(0.2, gt=0)  # how far the policy ratio may move before its gradient is cut
    clip_range_value: float = Field(0.2, gt=0)  # the same for the value
    vf_coef: float = Field(0.1, ge=0)  # weight of the value loss
    gamma: float = Field(1.0, ge=0, le=1)  # GAE discount
    lam: float = Field(0.95, ge=0, le=1)  # GAE bias/variance trade-off
    kl_estimator: Literal["k1", "k3"] = "k1"
    init_kl_coef: float = Field(0.05, ge=0)
    target_kl: float | None = Field(None, gt=0)  # per-answer KL to aim for; None keeps kl_coef fixed
    kl_horizon: int = Field(10000, gt=0)  # sequences over which the adaptive controller closes its error
    entropy_coef: float = Field(0.0, ge=0)  # exploration bonus; 0 = off
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    no_stop_penalty: float = Field(1.0, ge=0)  # subtracted from answers that never end
    whiten_advantages: bool = True


class PpoSection(PpoKnobs):
    reward_model: str | None = None  # a reward run (the learned proxy); None: optimise the gold verifier alone
    verifier: str | None = None  # a world data directory: the gold reward, logged every iteration
    rm_weight: float = Field(1.0, ge=0)  # the optimised score = rm_weight * proxy + gold_weight * gold
    gold_weight: float = Field(0.0, ge=0)
    value_model: Literal["reward", "head"] = "reward"  # critic: a copy of the reward model, or a head on the policy
    iterations: int = Field(40, gt=0)
    eval_every: int = Field(10, gt=0)  # iterations between greedy evaluations on eval.prompts
    monitor: MonitorSection = MonitorSection()

    @model_validator(mode="after")
    def _some_reward(self) -> PpoSection:
        if self.reward_model is None and not (self.verifier and self.gold_weight > 0):
            raise ValueError("set ppo.reward_model, or ppo.verifier with ppo.gold_weight > 0: PPO needs a reward")
        if self.value_model == "reward" and self.reward_model is None:
            raise ValueError("ppo.value_model: reward needs ppo.reward_model; use value_model: head")
        return self


class PpoRecipe(FineTuneRecipe):
    stage: Literal["ppo"]
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection(lr=1e-5, save_every=10)
    ppo: PpoSection
    eval: EvalSection = EvalSection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "model.path", "ppo.reward_model", "ppo.verifier",
                                              "eval.prompts", "eval.verifier")


# --- group-relative RL (GRPO, RLOO) ---------------------------------------------------------------------

RewardName = Literal["gold", "reward_model", "final_number", "exact", "choice", "format"]


class RewardSource(Section):
    """One reward of `grpo.rewards` (posttrain/rewards.py computes it). The optimised reward is the
    weighted sum; every source is logged on its own, so weight 0 watches a reward without optimising it."""

    source: RewardName
    weight: float = Field(1.0, ge=0)
    # gold: a world data directory (world.json); reward_model: a reward run (standardised on the
    # starting policy's answers, as PPO does)
    path: str | None = None
    # final_number / exact / choice: the prompt file's column holding the right answer (GSM8K's
    # "... #### 42", a string, a choice letter)
    field: str | None = None
    regex: str | None = None  # format: the answer must match this (Python re.search); default: it ends its turn
    name: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")  # how it is logged; default: the source

    @model_validator(mode="after")
    def _arguments(self) -> RewardSource:
        s = self.source
        if s in ("gold", "reward_model") and not self.path:
            what = "a world data directory (runs/world/data)" if s == "gold" else "a reward run (runs/world/reward)"
            raise ValueError(f"source {s} needs path: {what}")
        if s in ("final_number", "exact", "choice") and not self.field:
            raise ValueError(f"source {s} needs field: the prompt column with the right answer (e.g. answer)")
        if s != "format" and self.regex is not None:
            raise ValueError(f"regex belongs to source format, not {s}; remove it")
        if s not in ("final_number", "exact", "choice") and self.field is not None:
            raise ValueError(f"field belongs to final_number, exact or choice, not {s}; remove it")
        if s not in ("gold", "reward_model") and self.path is not None:
            raise ValueError(f"path belongs to gold or reward_model, not {s}; remove it")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or self.source


class GrpoSection(Section):
    """Group-relative RL on TRL's GRPOTrainer or RLOOTrainer (posttrain/stages/grpo.py)."""

    algorithm: Literal["grpo", "rloo"] = "grpo"  # rloo: leave-one-out baseline, KL in the reward (RLOOTrainer)
    rewards: list[RewardSource] = Field(min_length=1)
    prompt_field: str = "prompt"  # the data.train column that holds the prompt (GSM8K: question)
    num_generations: int = Field(8, ge=2)  # answers per prompt: the group each answer is compared within
    # grpo only: how the per-token losses are averaged (TRL GRPOConfig.loss_type)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    beta: float = Field(0.04, ge=0)  # KL to the reference; 0 loads no reference model
    epsilon: float = Field(0.2, gt=0)  # clip range of the policy ratio (below 1)
    epsilon_high: float | None = Field(None, gt=0)  # above 1 (DAPO's clip-higher); default: epsilon
    # grpo: divide advantages by the group's std, the batch's, or not at all (Dr. GRPO); rloo: group
    # and batch normalise the leave-one-out advantages over the batch, none leaves them raw
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, gt=0)  # optimisation passes over each generated batch
    max_completion_length: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    mask_truncated_completions: bool = False  # answers that never end get no gradient
    eval_every: int = Field(10, gt=0)  # steps between greedy evaluations on eval.prompts (with a gold reward)
    # TRL's vLLM generation (colocated in each training process); needs CUDA and `pip install vllm`
    vllm: bool = False
    monitor: MonitorSection = MonitorSection()

    @model_validator(mode="after")
    def _checks(self) -> GrpoSection:
        labels = [r.label for r in self.rewards]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"rewards: {dup[0]} appears twice; give one of them a name: ...")
        if not any(r.weight > 0 for r in self.rewards):
            raise ValueError("rewards: every weight is 0, so nothing is optimised; give one a weight > 0")
        if self.algorithm == "rloo" and self.loss_type != "dapo":
            raise ValueError("loss_type: rloo has one loss (RLOOTrainer); remove grpo.loss_type or set algorithm: grpo")
        return self


class GrpoRecipe(FineTuneRecipe):
    stage: Literal["grpo"]
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection(lr=1e-5, batch_size=32, max_steps=40, save_every=10)
    grpo: GrpoSection
    eval: EvalSection = EvalSection()
    input_paths: ClassVar[tuple[str, ...]] = ("data.train", "model.path", "eval.prompts", "eval.verifier")

    def paths(self) -> dict[str, str]:
        out = super().paths()
        for i, r in enumerate(self.grpo.rewards):
            if r.path:
                out[f"grpo.rewards.{i}.path"] = r.path
        return out
