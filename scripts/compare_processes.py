"""One process against N data-parallel processes, stage by stage, at the same global batch.

    .venv/bin/python scripts/compare_processes.py                      # every stage, 2 processes
    .venv/bin/python scripts/compare_processes.py --stages sft,ppo --out runs/compare_processes
    .venv/bin/python scripts/compare_processes.py --stages sft,dpo --accel fsdp      # FSDP2 instead of DDP
    .venv/bin/python scripts/compare_processes.py --stages sft --machines 2          # 2 "machines" on this host

For each stage it runs the same recipe twice on this machine: once as one plain process with
batch B x N, once under `accelerate launch --config_file recipes/accelerate/ddp.yaml
--num_processes N` with batch B per process (on a CPU the processes talk over gloo). The global
batch, the data order and the seed are the same, so the two runs compute the same updates up to
the order of floating-point sums; the table lists the loss of every logged step side by side.
PPO's batch is its rollout: rollout_batch_size and minibatch_size are divided the same way, each
epoch is one minibatch, and top_p is tiny so that sampling picks the most likely token: rollouts
then do not depend on how the processes split the random stream (with real sampling each process
draws its own samples, and only the distribution of the curves agrees). GRPO samples for real: each
answer has a random stream of its own (posttrain/sampling.py), so both runs draw the same answers.

Inputs (a small world, a tiny base GPT, an SFT model and a reward model) are built first with
one process, as tests/conftest.py builds its fixtures. Everything goes under --out; the table is
printed and written to OUT/compare.md, the numbers to OUT/compare.json. Each process runs on one
thread (OMP_NUM_THREADS=1). About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from posttrain.stages import STAGES as REGISTRY

ROOT = Path(__file__).resolve().parent.parent
STAGES = [name for name in REGISTRY if name != "world"]  # every stage that trains, in pipeline order
# Stage -> the metrics.jsonl keys compared (the first is the loss in the table).
KEYS = {"ppo": ("policy_loss", "value_loss", "score", "kl"), "grpo": ("reward", "kl", "completions/mean_length")}
DEFAULT_KEYS = ("loss",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(stage: str, recipe: Path, processes: int = 1, *args: str, accel: str = "ddp") -> list[str]:
    """`posttrain STAGE RECIPE`, or the same under `accelerate launch` with N processes and
    recipes/accelerate/ACCEL.yaml (make GPUS=N ACCEL=...)."""
    cli = ["-m", "posttrain.cli", stage, str(recipe), *args]
    if processes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / f"{accel}.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(free_port()), *cli]


def machine_commands(stage: str, recipe: Path, processes: int, machines: int, *args: str) -> list[list[str]]:
    """The `accelerate launch` line of each of `machines` hosts (recipes/accelerate/multinode.yaml),
    `processes` in all, here all on this host: machine 0 at 127.0.0.1 hosts the rendezvous."""
    port = str(free_port())
    return [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "recipes" / "accelerate" / "multinode.yaml"), "--num_processes", str(processes),
             "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "-m", "posttrain.cli", stage, str(recipe), *args]
            for rank in range(machines)]


def run(stage: str, recipe: Path, processes: int = 1, *args: str, machines: int = 1,
        accel: str = "ddp") -> subprocess.CompletedProcess:
    """Run the stage and wait; with machines > 1, one launch per machine at once (each as its host would)."""
    lines = machine_commands(stage, recipe, processes, machines, *args) if machines > 1 else \
        [command(stage, recipe, processes, *args, accel=accel)]
    procs = [subprocess.Popen(line, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for line in lines]
    done = []
    for line, p in zip(lines, procs, strict=True):
        try:
            out, err = p.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(line, p.returncode, out, err))
    for i, proc in enumerate(done):
        if proc.returncode != 0:
            who = f"machine {i} of {machines}, " if machines > 1 else ""
            raise RuntimeError(f"{stage} with {who}{processes} process(es) failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return done[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_inputs(out: Path) -> dict[str, Path]:
    """A small world, a tiny base GPT, an SFT model and a reward model (as tests/conftest.py)."""
    world, base, sft, reward = out / "data", out / "base", out / "sft", out / "reward"
    run("world", write(out / "world.yaml", f"stage: world\nworld: {{people: 24, bios_per_person: 4, skill_docs: 40}}\n"
                                          f"output_dir: {world}\n"))
    run("pretrain", write(out / "base.yaml", f"""\
stage: pretrain
model: {{config: {{n_layer: 2, n_embd: 64, n_head: 2}}}}
data: {{train: {world}/pretrain.jsonl, max_length: 128}}
train: {{max_steps: 120, batch_size: 8, lr: 3.0e-3, warmup: 10, save_every: 1000}}
logging: {{every: 20}}
output_dir: {base}
"""))
    run("sft", write(out / "sft.yaml", f"""\
stage: sft
model: {{path: {base}, chat_template: {ROOT / 'data_templates' / 'chatml.jinja'}}}
data: {{train: {world}/sft_train.jsonl, max_length: 128}}
train: {{max_steps: 30, lr: 2.0e-3, batch_size: 8, packing: true, save_every: 1000}}
logging: {{every: 10}}
output_dir: {sft}
"""))
    run("reward", write(out / "reward.yaml", f"""\
stage: reward
model: {{path: {sft}}}
data: {{train: {world}/pref_train.jsonl, max_length: 128}}
reward: {{gold_pairs: 0}}
train: {{max_steps: 20, lr: 1.0e-3, batch_size: 8, save_every: 1000}}
logging: {{every: 10}}
output_dir: {reward}
"""))
    return {"world": world, "base": base, "sft": sft, "reward": reward}


def stage_recipe(stage: str, inputs: dict[str, Path], output_dir: Path, batch: int, steps: int = 20) -> str:
    """The recipe compared for `stage`, with `batch` examples (PPO: prompts) per process and step."""
    w = inputs["world"]
    common = f"logging: {{every: 1}}\noutput_dir: {output_dir}\nseed: 0\n"
    # generation at the end (rank 0 alone), kept small
    answers = f"eval: {{prompts: {w}/eval_prompts.jsonl, verifier: {w}, limit: 8, max_new_tokens: 8}}\n"
    train = f"train: {{max_steps: {steps}, batch_size: {batch}, lr: {{lr}}, warmup: 2, save_every: 1000}}\n"
    if stage == "pretrain":
        return (f"stage: pretrain\nmodel: {{config: {{n_layer: 2, n_embd: 64, n_head: 2}}}}\n"
                f"data: {{train: {w}/pretrain.jsonl, max_length: 128}}\n" + train.replace("{lr}", "3.0e-3") + common)
    if stage == "sft":
        return (f"stage: sft\nmodel: {{path: {inputs['base']}, chat_template: {ROOT / 'data_templates' / 'chatml.jinja'}}}\n"
                f"data: {{train: {w}/sft_train.jsonl, eval: {w}/sft_eval.jsonl, max_length: 128}}\n"
                + train.replace("{lr}", "2.0e-3").replace("save_every", "packing: true, save_every") + answers + common)
    if stage == "classify":
        return (f"stage: classify\nmodel: {{path: {inputs['base']}}}\n"
                f"data: {{train: {w}/intent_train.jsonl, eval: {w}/intent_val.jsonl, max_length: 64}}\n"
                f"classify: {{test: {w}/intent_test.jsonl, trainable: all}}\n" + train.replace("{lr}", "5.0e-4") + common)
    if stage == "reward":
        return (f"stage: reward\nmodel: {{path: {inputs['sft']}}}\n"
                f"data: {{train: {w}/pref_train.jsonl, eval: {w}/pref_eval.jsonl, max_length: 128}}\n"
                f"reward: {{gold_pairs: 0}}\n" + train.replace("{lr}", "1.0e-3") + common)
    if stage == "dpo":
        return (f"stage: dpo\nmodel: {{path: {inputs['sft']}}}\n"
                f"data: {{train: {w}/pref_train.jsonl, eval: {w}/pref_eval.jsonl, max_length: 128}}\n"
                f"dpo: {{beta: 0.1}}\n" + train.replace("{lr}", "5.0e-4") + answers + common)
    if stage == "ppo":
        iterations = max(1, steps // 3)
        return (f"stage: ppo\nmodel: {{path: {inputs['sft']}}}\n"
                f"data: {{train: {w}/ppo_prompts.jsonl, max_length: 128}}\n"
                f"ppo: {{reward_model: {inputs['reward']}, verifier: {w}, iterations: {iterations}, "
                f"rollout_batch_size: {batch}, minibatch_size: {batch}, ppo_epochs: 2, max_new_tokens: 12, "
                f"top_p: 1.0e-6, eval_every: 1000}}\n"
                f"train: {{lr: 1.0e-4, save_every: 1000}}\n" + answers + common)
    # GRPO: batch counts answers (batch / 4 prompts per process and step, 4 answers each). The tiny SFT
    # model's gold is 0 everywhere, so the format reward (did the answer end its turn?) gives the
    # groups their spread, and with it gradients.
    if stage == "grpo":
        return (f"stage: grpo\nmodel: {{path: {inputs['sft']}}}\n"
                f"data: {{train: {w}/ppo_prompts.jsonl, max_length: 128}}\n"
                f"grpo: {{rewards: [{{source: gold, path: {w}}}, {{source: format}}], num_generations: 4, max_completion_length: 12, "
                f"eval_every: 1000}}\n" + train.replace("{lr}", "1.0e-3") + answers + common)
    raise ValueError(stage)


def curve(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r and "eval_loss" not in r}


def outputs(run_dir: Path) -> list[str]:
    """The files of a run directory, with the names that depend on the process count or the clock
    made alike (a checkpoint holds one rng_state file per process; TensorBoard names its event files
    after the host and time)."""
    names = set()
    for p in run_dir.rglob("*"):
        if p.is_file():
            name = str(p.relative_to(run_dir))
            name = re.sub(r"rng_state(_\d+)?\.pth$", "rng_state.pth", name)
            names.add(re.sub(r"events\.out\.tfevents\..*$", "events.out.tfevents", name))
    return sorted(names)


def compare_stage(stage: str, inputs: dict[str, Path], out: Path, processes: int = 2, batch: int = 4,
                  steps: int = 20, machines: int = 1, accel: str = "ddp", overrides: tuple[str, ...] = ()) -> dict:
    """Run `stage` with 1 process x batch*processes and `processes` x batch (launched with
    recipes/accelerate/ACCEL.yaml, or spread over `machines` launches as on that many hosts); their
    curves side by side. `overrides` (KEY=VALUE, as --set takes them) change both runs' recipe."""
    runs = {}
    for n, b in ((1, batch * processes), (processes, batch)):
        name = f"{n}proc"
        if n > 1 and machines > 1:
            name += f"_{machines}machines"
        elif n > 1 and accel != "ddp":
            name += f"_{accel}"
        d = out / stage / name
        recipe = write(d.with_suffix(".yaml"), stage_recipe(stage, inputs, d, b, steps))
        sets = [a for o in overrides for a in ("--set", o)]
        run(stage, recipe, n, "--force", *sets, machines=1 if n == 1 else machines, accel=accel)
        runs[n] = d
    result = {"stage": stage, "processes": processes, "machines": machines, "accel": accel, "batch_per_process": batch,
              "overrides": list(overrides),
              "runs": {k: str(v) for k, v in runs.items()},
              "keys": {},
              # only rank 0 writes: the same files, and as many metrics lines, as the one-process run
              "same_files": outputs(runs[1]) == outputs(runs[processes]),
              "metrics_lines": [len((runs[n] / "metrics.jsonl").read_text().splitlines()) for n in (1, processes)]}
    for key in KEYS.get(stage, DEFAULT_KEYS):
        one, many = curve(runs[1], key), curve(runs[processes], key)
        if sorted(one) != sorted(many):
            raise AssertionError(f"{stage}: logged steps differ: {sorted(one)} vs {sorted(many)}")
        diffs = [abs(one[s] - many[s]) for s in one]
        rel = [d / max(abs(one[s]), 1e-8) for d, s in zip(diffs, one, strict=True)]
        result["keys"][key] = {"steps": sorted(one), "one": [one[s] for s in sorted(one)],
                               "many": [many[s] for s in sorted(one)], "max_abs_diff": max(diffs),
                               "max_rel_diff": max(rel)}
    return result


def table(result: dict) -> str:
    key = next(iter(result["keys"]))
    k = result["keys"][key]
    n, b = result["processes"], result["batch_per_process"]
    m = result.get("machines", 1)
    many = f"{n} processes" + (f" on {m} machines" if m > 1 else "") + \
        (f" ({result['accel']})" if result.get("accel", "ddp") != "ddp" else "")
    lines = [f"### {result['stage']}: {key}, 1 process x batch {n * b} vs {many} x batch {b}", "",
             f"| step | 1 process | {many} | abs diff |", "|---:|---:|---:|---:|"]
    for s, a, m in zip(k["steps"], k["one"], k["many"], strict=True):
        lines.append(f"| {s} | {a:.6f} | {m:.6f} | {abs(a - m):.1e} |")
    for name, v in result["keys"].items():
        lines.append(f"\n{name}: max abs diff {v['max_abs_diff']:.2e}, max rel diff {v['max_rel_diff']:.2e} "
                     f"over {len(v['steps'])} steps")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compare_processes", help="output folder (default: runs/compare_processes)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    p.add_argument("--processes", type=int, default=2, help="processes of the data-parallel run (default 2)")
    p.add_argument("--machines", type=int, default=1,
                   help="spread the processes over this many launches of recipes/accelerate/multinode.yaml, as on "
                        "that many hosts (here all on 127.0.0.1; default 1: one launch of ddp.yaml)")
    p.add_argument("--accel", default="ddp", help="recipes/accelerate/ACCEL.yaml for the N-process run (default ddp; fsdp)")
    p.add_argument("--batch", type=int, default=4, help="batch per process (default 4: global batch 8)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (PPO: a third as many iterations)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for both runs, e.g. --set 'model.lora={r: 8}' (repeatable)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s): {', '.join(sorted(unknown))}")
    if args.machines < 1 or args.processes % args.machines:
        p.error(f"--processes {args.processes} must be a multiple of --machines {args.machines}")
    print(f"building inputs in {out} ...", flush=True)
    inputs = build_inputs(out / "inputs")
    results, text = [], []
    for stage in stages:
        print(f"{stage}: 1 process, then {args.processes} ...", flush=True)
        results.append(compare_stage(stage, inputs, out, args.processes, args.batch, args.steps, args.machines,
                                     args.accel, tuple(args.overrides)))
        text.append(table(results[-1]))
        print(text[-1], flush=True)
    (out / "compare.md").write_text("\n".join(text))
    (out / "compare.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
