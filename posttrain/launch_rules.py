"""Check a recipe against the way it will be launched, before anything is loaded.

`make <stage> GPUS=N ACCEL=X` runs `accelerate launch --config_file recipes/accelerate/X.yaml
--num_processes N -m posttrain.cli STAGE RECIPE`. Some combinations of recipe, launcher config and
machine fail only after minutes of model loading, or worse, run without failing and do the wrong
thing (N processes that each train alone, a run directory without weights). `check_launch` refuses
them up front with one line (the combination, the reason, the fix) and returns notes for the ones
that work with a caveat. Each rule cites the installed source that backs it.

`posttrain validate RECIPE [--accel recipes/accelerate/X.yaml]` calls it; without --accel the launch
is a single plain process, as `posttrain STAGE RECIPE` runs.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from posttrain import training
from posttrain.errors import UserError
from posttrain.recipe import Recipe
from posttrain.recipe_file import read_yaml
from posttrain.stages import STAGES

MULTI_PROCESS = ("MULTI_GPU", "FSDP", "DEEPSPEED")
SHARDED = ("FSDP", "DEEPSPEED")


@dataclass
class Launch:
    """The parts of an accelerate config file that the rules read."""

    path: str
    distributed_type: str  # NO, MULTI_GPU, FSDP, DEEPSPEED, MULTI_CPU, ...
    num_processes: int  # -1: not in the file (accelerate then needs --num_processes)
    mixed_precision: str  # no, bf16, fp16, fp8
    fsdp: dict = field(default_factory=dict)  # keys normalised to fsdp_*
    deepspeed: dict = field(default_factory=dict)
    num_machines: int = 1

    @property
    def name(self) -> str:
        return f"{self.path} ({self.distributed_type})"


def read_config(path: str | Path) -> Launch:
    """Read an `accelerate launch --config_file` YAML the way accelerate 1.15 does, and also catch
    what it lets through silently. Raises UserError naming the file, the problem and the fix."""
    path = Path(path)
    fix = "compare with recipes/accelerate/*.yaml or regenerate it with `accelerate config`"
    if not path.is_file():
        raise UserError(f"--accel {path}: no such accelerate config; use one of recipes/accelerate/*.yaml")
    raw, _ = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: an accelerate config is a YAML mapping of keys to values; {fix}")
    # YAML 1.1 reads a bare `NO` / `no` as false; accelerate then fails deep inside the launcher
    # (DistributedType(False), False.lower()).
    for key in ("distributed_type", "mixed_precision"):
        if isinstance(raw.get(key), bool):
            raise UserError(f"{path}: {key}: {raw[key]} is a YAML boolean; quote the value (\"NO\" / \"no\")")
    if raw.get("compute_environment", "LOCAL_MACHINE") != "LOCAL_MACHINE":
        raise UserError(f"{path}: compute_environment {raw['compute_environment']!r} is not supported; "
                        "posttrain launches on this machine (LOCAL_MACHINE)")

    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import PrecisionType

    # accelerate/commands/config/config_args.py (BaseConfig.from_yaml_file): unknown top-level keys
    # and a missing or unknown distributed_type are errors there; we report them before launching.
    try:
        config = ClusterConfig.from_yaml_file(yaml_file=str(path))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: accelerate rejects it ({' '.join(str(e).split())}); {fix}") from None
    mixed = str(config.mixed_precision or "no")
    if mixed not in PrecisionType.list():
        raise UserError(f"{path}: mixed_precision {mixed!r} is not one of {', '.join(PrecisionType.list())}")
    launch = Launch(str(path), config.distributed_type.value, int(config.num_processes), mixed,
                    {(k if k.startswith("fsdp") else f"fsdp_{k}"): v for k, v in (config.fsdp_config or {}).items()},
                    dict(config.deepspeed_config or {}), int(config.num_machines or 1))
    _check_nested_keys(launch)
    _check_fsdp_values(launch)
    return launch


def _launch_options(group_title: str) -> set[str]:
    """The `accelerate launch` options of one argument group (accelerate/commands/launch.py)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    for group in parser._action_groups:
        if group.title == group_title:
            return {action.dest for action in group._group_actions}
    return set()


def _check_nested_keys(launch: Launch) -> None:
    # accelerate/commands/launch.py (_validate_launch_command) copies every fsdp_config /
    # deepspeed_config key onto the launch arguments with setattr and reads only the ones it knows,
    # so a misspelt key (fsdp_transformer_layer_cls_to_warp) is ignored without a word.
    # utils/launch.py also reads fsdp_ignored_modules, which has no command-line option.
    for section, entries, group, extra in (("fsdp_config", launch.fsdp, "FSDP Arguments", {"fsdp_ignored_modules"}),
                                           ("deepspeed_config", launch.deepspeed, "DeepSpeed Arguments", set())):
        if not entries:
            continue
        known = _launch_options(group) | extra
        for key in entries:
            if key not in known:
                import difflib

                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
                raise UserError(f"{launch.path}: unknown {section} key {key!r}{hint}; accelerate would ignore it silently")


def _check_fsdp_values(launch: Launch) -> None:
    # The FSDP plugin validates these only inside every launched process
    # (accelerate/utils/dataclasses.py FullyShardedDataParallelPlugin.__post_init__; the allowed
    # names are accelerate/utils/constants.py FSDP_AUTO_WRAP_POLICY / FSDP_STATE_DICT_TYPE /
    # FSDP2_STATE_DICT_TYPE).
    if launch.distributed_type != "FSDP":
        return
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE, FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE

    f = launch.fsdp
    version = str(f.get("fsdp_version", 1))
    if version not in ("1", "2"):
        raise UserError(f"{launch.path}: fsdp_version {version!r} must be 1 or 2")
    checks = (("fsdp_auto_wrap_policy", FSDP_AUTO_WRAP_POLICY),
              ("fsdp_state_dict_type", FSDP2_STATE_DICT_TYPE if version == "2" else FSDP_STATE_DICT_TYPE))
    for key, allowed in checks:
        value = f.get(key)
        if value is not None and str(value).upper() not in allowed:
            raise UserError(f"{launch.path}: {key} {value!r} is not one of {', '.join(allowed)} (FSDP{version})")
    if version == "2" and not isinstance(f.get("fsdp_reshard_after_forward", True), bool):
        raise UserError(f"{launch.path}: fsdp_reshard_after_forward must be true or false with fsdp_version 2 "
                        f"(got {f['fsdp_reshard_after_forward']!r}, an FSDP1 sharding strategy)")


# --- the rules -------------------------------------------------------------------------------------


def check_launch(recipe: Recipe, accel_config_path: str | Path | None = None, *, num_processes: int | None = None,
                 cuda: bool | None = None, deepspeed: bool | None = None) -> list[str]:
    """Check `recipe` launched with `accel_config_path` (None: one plain process) on this machine.

    `num_processes` is what `--num_processes` (make GPUS=N) will say; default: the config's.
    `cuda` / `deepspeed` describe the machine; default: this one. Returns notes; raises UserError
    (one line: combination, reason, fix) for a combination known to break or unsupported here."""
    launch = read_config(accel_config_path) if accel_config_path else Launch("a single process", "NO", 1, "no")
    n = num_processes if num_processes is not None else launch.num_processes
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if deepspeed is None:
        # the same test as accelerate.utils.is_deepspeed_available, without importing deepspeed
        deepspeed = importlib.util.find_spec("deepspeed") is not None
    where = f"{recipe.stage} with {launch.name}"
    notes: list[str] = []

    # accelerate/commands/launch.py (launch_command): NO and MULTI_CPU go to simple_launcher, which
    # starts one process whatever --num_processes says (so does `accelerate launch --cpu`).
    if launch.distributed_type in ("NO", "MULTI_CPU") and n > 1:
        raise UserError(f"{where} and {n} processes: accelerate starts only one process for this distributed_type; "
                        "use recipes/accelerate/ddp.yaml (MULTI_GPU), which starts N processes (on gloo without a GPU)")

    # accelerate/utils/launch.py (prepare_multi_gpu_env): each machine starts num_processes //
    # num_machines processes, so a remainder is silently dropped and the global batch is not the one asked for.
    if launch.num_machines > 1:
        if n % launch.num_machines:
            raise UserError(f"{where}: {n} processes do not split evenly over {launch.num_machines} machines (accelerate "
                            f"would start {n // launch.num_machines} on each); --num_processes counts all machines "
                            f"together, so make it a multiple of {launch.num_machines}")
        notes.append(f"{where}: {launch.num_machines} machines, {n // launch.num_machines} process(es) each; start the "
                     "same command on every machine with its own --machine_rank, output_dir on a file system they share")

    # posttrain/sharding.py (check_stage): what sharded weights cannot take, whatever is installed
    if launch.distributed_type in SHARDED:
        from posttrain.sharding import check_stage

        kind = "FSDP" if launch.distributed_type == "FSDP" else f"ZeRO-{_zero_stage(launch)}"
        check_stage(recipe, kind, cuda=cuda)

    # accelerate/state.py (PartialState.__init__): ACCELERATE_USE_DEEPSPEED without the package is an
    # ImportError in every process, after the launcher has started them.
    if launch.distributed_type == "DEEPSPEED" and not deepspeed:
        raise UserError(f"{where}: the deepspeed package is not installed; `make deepspeed` installs it (on a CPU "
                        "too), or launch with recipes/accelerate/ddp.yaml or fsdp.yaml")

    if not cuda:
        notes += _check_no_cuda(recipe, launch, n, where)

    if launch.distributed_type == "FSDP":
        notes += _check_fsdp(recipe, launch, where)
    if launch.distributed_type == "DEEPSPEED":
        notes += _check_deepspeed(recipe, launch, where)

    if cuda and n > 1:
        import torch

        gpus = torch.cuda.device_count()
        if n > gpus:
            notes.append(f"{launch.path} asks for {n} processes and this machine has {gpus} GPU(s); launch with "
                         f"--num_processes {gpus} (make GPUS={gpus})")
    return notes


def _zero_stage(launch: Launch) -> int:
    return int(launch.deepspeed.get("zero_stage", 2))  # accelerate's default (DeepSpeedPlugin.__post_init__)


def _check_no_cuda(recipe: Recipe, launch: Launch, n: int, where: str) -> list[str]:
    """Rules for a machine without a CUDA GPU. Returns notes."""
    notes: list[str] = []
    # accelerate/state.py (AcceleratorState.__init__, PartialState._prepare_backend): FSDP and
    # DeepSpeed are set up only for GPU process groups; with cpu=True the processes fall back to
    # plain data parallel on gloo (FSDP) or ignore DeepSpeed, without saying so. Both shard on a CPU
    # too (posttrain/sharding.py fsdp_on_cpu, deepspeed_on_cpu: DeepSpeed's CPU accelerator).
    # transformers/training_args.py (TrainingArguments: bf16 without a bf16 GPU is a ValueError unless
    # use_cpu; fp16 needs a GPU) and posttrain/training.py use_bf16 (bf16 matmuls on a CPU are far
    # slower than fp32). The launcher's mixed_precision reaches the Trainer as ACCELERATE_MIXED_PRECISION.
    if launch.mixed_precision in ("bf16", "fp16", "fp8"):
        raise UserError(f"{where}: mixed_precision {launch.mixed_precision} needs a CUDA GPU and this machine has "
                        "none; set mixed_precision: \"no\" in the config (the recipe's model.dtype decides)")
    model = getattr(recipe, "model", None)
    if model is not None and model.dtype in ("bfloat16", "float16"):
        raise UserError(f"{recipe.stage} with model.dtype {model.dtype}: needs a CUDA GPU and this machine has none; "
                        "use --set model.dtype=float32 here (or auto: fp32 on a CPU, bf16 on a GPU that has it)")
    # transformers/training_args.py (_setup_devices) joins a CPU process group only with use_cpu=True
    # (or ACCELERATE_USE_CPU, which accelerate's multi-GPU launcher does not set:
    # accelerate/utils/launch.py prepare_multi_gpu_env); otherwise accelerate/state.py picks no
    # backend and every process trains the whole model alone. posttrain/training.py trainer_kwargs
    # sets use_cpu on a machine without CUDA, and posttrain/stages/ppo.py builds its Accelerator with
    # cpu=True there; checked on the real trainer arguments, so a change that drops it is caught here.
    multi = launch.distributed_type in MULTI_PROCESS and n > 1
    # (A DeepSpeed launch must not ask for the CPU: accelerate would drop DeepSpeed; deepspeed_on_cpu.)
    if multi and STAGES[recipe.stage].trainer and launch.distributed_type != "DEEPSPEED" and not _trainer_uses_cpu(recipe):
        raise UserError(f"{where} and {n} processes on a machine without CUDA: the Trainer joins a CPU process "
                        "group only with TrainingArguments(use_cpu=True), which posttrain/training.py does not set, "
                        f"so each process would train alone; run {recipe.stage} as one process here")
    if multi:
        # torch/distributed/run.py: torchrun gives each process OMP_NUM_THREADS=1 when it is unset.
        threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
        cores = os.cpu_count() or 1
        batch = ("ppo.rollout_batch_size and ppo.minibatch_size are per process" if recipe.stage == "ppo" else
                 f"train.batch_size is per process and counts answers: the global batch is {n} x batch_size x "
                 "grad_accum answers, grpo.num_generations per prompt" if recipe.stage == "grpo" else
                 f"train.batch_size is per process: the global batch is {n} x batch_size x grad_accum")
        notes.append(f"{where}: {n} processes on the CPU, data parallel over gloo, OMP_NUM_THREADS={threads} each; {batch}")
        if n * threads > cores:
            notes.append(f"{n} processes x {threads} thread(s) is more than this machine's {cores} CPU cores, which slows "
                         f"every process down; launch with --num_processes {max(1, cores // threads)} (make GPUS=...)")
    return notes


def _trainer_uses_cpu(recipe: Recipe) -> bool:
    """Whether the stage's TrainingArguments ask for the CPU (use_cpu=True) on this machine. On a
    machine with CUDA (where `cuda=False` only imagines one without) the answer is yes by construction."""
    import torch

    if torch.cuda.is_available():
        return True
    return bool(training.trainer_kwargs(recipe, SimpleNamespace(checkpoints=Path("unused"))).get("use_cpu"))


def _check_fsdp(recipe: Recipe, launch: Launch, where: str) -> list[str]:
    notes = []
    f = launch.fsdp
    version = int(f.get("fsdp_version", 1))
    model = getattr(recipe, "model", None)
    # transformers/trainer.py (Trainer.save_model): under FSDP the model is written only with
    # FULL_STATE_DICT; SHARDED_STATE_DICT saves no weights, and the run directory is useless to the
    # next stage (and to `posttrain chat`).
    state_dict = str(f.get("fsdp_state_dict_type", "FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT")).upper()
    if state_dict != "FULL_STATE_DICT":
        raise UserError(f"{where}: fsdp_state_dict_type {state_dict} makes Trainer.save_model write no model weights, "
                        "so the run directory could not be loaded; set fsdp_state_dict_type: FULL_STATE_DICT")
    # peft/tuners/trainable_tokens: new chat tokens train as a delta inside the embedding's wrapper.
    # peft's FSDP wrap policy (peft/utils/other.py fsdp_auto_wrap_policy, applied by
    # transformers/trainer.py update_fsdp_plugin_peft) gives leaf modules with a trainable weight a
    # unit of their own, but that wrapper is not a leaf, so its trainable delta shares the root unit
    # with the frozen embeddings, and FSDP1 refuses mixed requires_grad without use_orig_params
    # (torch/distributed/fsdp/_flat_param.py: "Must flatten tensors with uniform requires_grad").
    lora_tokens = recipe.stage == "sft" and model is not None and model.lora is not None and model.chat_template
    if lora_tokens:
        orig = str(f.get("fsdp_use_orig_params", "true")).lower() == "true"  # the launcher's default is true
        if version == 1 and not orig:
            raise UserError(f"{where}: LoRA with new chat tokens (model.lora + model.chat_template) trains a few embedding "
                            "rows beside frozen ones, which FSDP1 refuses without use_orig_params; set "
                            "fsdp_use_orig_params: true (or fsdp_version: 2)")
        if version == 1:  # FSDP2 is measured (posttrain/sharding.py check_stage refuses tied embeddings there)
            notes.append(f"{where}: LoRA with new chat tokens trains them through peft's trainable_token_indices, which "
                         "is untested under FSDP1; if it fails, use fsdp_version: 2 or recipes/accelerate/ddp.yaml")
    # accelerate/utils/dataclasses.py (FullyShardedDataParallelPlugin.set_auto_wrap_policy): a class
    # name that the model does not have is an error in every process after loading the model.
    layer = f.get("fsdp_transformer_layer_cls_to_wrap")
    if layer and str(f.get("fsdp_auto_wrap_policy", "")).upper() == "TRANSFORMER_BASED_WRAP":
        from posttrain.sharding import check_layer_classes

        check_layer_classes(recipe, str(layer), where)
    return notes


def _check_deepspeed(recipe: Recipe, launch: Launch, where: str) -> list[str]:
    notes = []
    ds = launch.deepspeed
    stage = _zero_stage(launch)
    model = getattr(recipe, "model", None)
    train = getattr(recipe, "train", None)
    # transformers/trainer.py (Trainer.save_model): under ZeRO-3 the full weights are gathered for
    # saving only with stage3_gather_16bit_weights_on_model_save (accelerate: zero3_save_16bit_model);
    # otherwise it saves an empty state dict plus a DeepSpeed checkpoint, which the next stage cannot load.
    if stage == 3 and str(ds.get("zero3_save_16bit_model", "false")).lower() != "true":
        raise UserError(f"{where}: ZeRO-3 without zero3_save_16bit_model saves only DeepSpeed shards, not a model the "
                        "next stage can load; set zero3_save_16bit_model: true")
    # transformers/integrations/deepspeed.py (HfTrainerDeepSpeedConfig.trainer_config_process): a
    # DeepSpeed value that is not "auto" must equal the TrainingArguments one, or the Trainer stops
    # with a mismatch error after loading everything.
    if train is not None:
        for key, value, recipe_key in (("gradient_accumulation_steps", train.grad_accum, "train.grad_accum"),
                                       ("gradient_clipping", train.max_grad_norm, "train.max_grad_norm")):
            if key in ds and str(ds[key]) != "auto" and float(ds[key]) != float(value):
                raise UserError(f"{where}: deepspeed_config {key}: {ds[key]} differs from the recipe's {recipe_key} "
                                f"({value}); remove {key} from the config (it then follows the recipe)")
    # trl/trainer/sft_trainer.py, dpo_trainer.py, reward_trainer.py: "PEFT + DeepSpeed ZeRO-3
    # requires reentrant checkpointing", so TRL sets use_reentrant=True there.
    if (stage == 3 and STAGES[recipe.stage].trl_peft and model is not None and model.lora is not None
            and model.gradient_checkpointing):
        notes.append(f"{where}: with LoRA and model.gradient_checkpointing under ZeRO-3, TRL forces reentrant "
                     "gradient checkpointing (slower; it recomputes more); expected, not an error")
    return notes


# -- what launches, all of it: the table `posttrain launches` prints and the README shows ------------

CONFIGS = ("single", "ddp", "multinode", "fsdp", "zero2", "zero3")  # recipes/accelerate/*.yaml
VARIANTS = {"full": (), "LoRA": ("model.lora={r: 8}",), "grad. ckpt": ("model.gradient_checkpointing=true",)}


def support(stage: str, config: str, variant: str, *, cuda: bool = True) -> str | None:
    """None if `posttrain STAGE recipes/gpt2/STAGE.yaml` with this variant launches with
    recipes/accelerate/CONFIG.yaml (2 processes; DeepSpeed installed), else the one-line refusal.
    "n/a" where the variant does not exist for the stage (LoRA in pretraining)."""
    from posttrain.recipe_file import load_recipe

    root = Path(__file__).resolve().parent.parent / "recipes"
    overrides = list(VARIANTS[variant])
    if variant == "LoRA" and stage == "classify":
        overrides = ["classify.trainable=lora"]
    if variant == "LoRA" and stage == "pretrain":
        return "n/a"
    recipe = load_recipe(root / "gpt2" / f"{stage}.yaml", ["model.dtype=float32", *overrides])
    try:
        check_launch(recipe, root / "accelerate" / f"{config}.yaml", num_processes=1 if config == "single" else 2,
                     cuda=cuda, deepspeed=True)
    except UserError as e:
        return str(e)
    return None


def support_table(cuda: bool = True) -> str:
    """Markdown: launcher config x training stage; each cell says which of full fine-tuning, LoRA and
    gradient checkpointing launch, as check_launch decides; refusals are numbered notes below."""
    reasons: dict[str, int] = {}

    def cell(stage: str, config: str) -> str:
        yes, no = [], []
        for variant in VARIANTS:
            why = support(stage, config, variant, cuda=cuda)
            if why is None:
                yes.append(variant)
            elif why != "n/a":
                reason = why.split(": ", 1)[1] if ": " in why else why  # without the "<stage> with <config>" prefix
                no.append((variant, reasons.setdefault(reason, len(reasons) + 1)))
        if not no:
            return "yes"
        if not yes:
            return f"no ({no[0][1]})" if len({n for _, n in no}) == 1 else "no (" + ", ".join(f"{v}: {n}" for v, n in no) + ")"
        return ", ".join(yes) + "; " + ", ".join(f"{v} no ({n})" for v, n in no)

    stages = [s for s in STAGES if s != "world"]
    lines = ["| config | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for config in CONFIGS:
        lines.append(f"| {config} | " + " | ".join(cell(stage, config) for stage in stages) + " |")
    lines.append("")
    lines += [f"{n}. {reason}" for reason, n in reasons.items()]
    return "\n".join(lines) + "\n"
