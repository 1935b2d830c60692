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

`posttrain COMMAND --help` documents each command."""

# name -> (module, help, description)
STAGES = {
    "world": ("posttrain.stages.world", "generate the built-in world's datasets",
              "Generate the built-in world from a seed: people and facts, the pretraining corpus, chat SFT data "
              "(held-out people excluded), classification data, preference pairs, PPO and evaluation prompts. "
              "The same recipe always gives byte-identical files. Default recipe: recipes/world/world.yaml."),
    "pretrain": ("posttrain.stages.pretrain", "pretrain a GPT-2 from scratch (the world's base model)",
                 "Train a byte-level BPE tokenizer (or load one) and a GPT-2 from scratch on a text corpus. Saves a "
                 "standard Hugging Face model directory and reports the loss and, given probe prompts, how many facts "
                 "the model completes correctly (fact_recall in summary.json)."),
}
DEFAULT_RECIPES = {"world": "recipes/world/world.yaml"}


def _stage_parser(sub, name: str) -> None:
    module, help_, desc = STAGES[name]
    p = sub.add_parser(name, help=help_, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = DEFAULT_RECIPES.get(name)
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
    from posttrain.recipe import check_inputs, load_recipe
    from posttrain.runs import AlreadyDone

    recipe = load_recipe(args.recipe, args.overrides, stage=name)
    check_inputs(recipe)
    module = importlib.import_module(STAGES[name][0])
    try:
        out = module.run(recipe, force=args.force)
    except AlreadyDone as done:
        print(f"{done} is already done with this recipe; skipping (use --force to run it again)")
        return 0
    print(f"{name} done: {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from posttrain.recipe import check_inputs, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_inputs(recipe, offline=args.offline)
    for note in notes:
        print(f"note: {note}")
    print(f"{args.recipe}: ok ({recipe.stage} recipe, output_dir {recipe.output_dir})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGES:
        _stage_parser(sub, name)
    v = sub.add_parser("validate", help="check a recipe without training",
                       description="Check a recipe against the schema (unknown keys, types, ranges) and check that every "
                                   "file and run directory it reads exists and is finished. Nothing is trained or written.")
    v.add_argument("recipe", help="recipe YAML")
    _add_set(v)
    v.add_argument("--offline", action="store_true", help="do not contact the Hugging Face Hub; hub names are only noted")
    v.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
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


if __name__ == "__main__":
    sys.exit(main())
