"""`make bench`: how fast posttrain trains and generates, against the bare PyTorch loop and against what a
user would run instead, measured side by side in one command.

    python -m posttrain.bench                     # every section at full size on runs/world (~20 min, 2 cores)
    python -m posttrain.bench --size smoke ...    # a few steps each (the smoke test)
    python -m posttrain.bench one NAME ...        # one contender alone: the command each row names

Each contender runs in its own process (same threads, nothing left over from the one before), and the
contenders of a section take turns, `rounds` times, so that a slow minute on a shared machine hits them
alike; a figure is the median over rounds. Ratios are what the bench claims; absolute times sit beside
them only as context. Sections:

  sft       training tokens/s of `posttrain sft` vs a bare loop on the same model and the same packed
            batches (forward, masked loss, backward, AdamW) and vs TRL's SFTTrainer with its defaults
  reward    seconds per step of `posttrain reward` vs a bare loop (both answers in one forward pass,
            Bradley-Terry loss) and vs TRL's RewardTrainer with its defaults
  dpo       the same for `posttrain dpo` (policy and reference forward passes, sigmoid + SFT loss)
  ppo       seconds per iteration of `posttrain ppo` vs TRL 1.12's PPOTrainer (the last TRL with one, in its
            own virtual environment under the output folder) at the same settings, split into phases,
            with the gold score of both policies afterwards; rollout tokens/s vs a bare model.generate
  generate  answers/s of the evaluation path (compare, the stages' evals) vs a bare batched generate
  pipeline  per-stage seconds of the finished runs in the world folder, and a timed re-run of
            `make pipeline` on them (every stage must skip)

Writes OUT/bench.md and OUT/bench.json (OUT: runs/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_PPO_VERSION = "1.12.0"  # the last TRL release with a PPOTrainer (trl.experimental.ppo)


@dataclass(frozen=True)
class Size:
    sft_steps: int
    reward_steps: int
    dpo_steps: int
    ppo_iterations: int
    generate_calls: int  # bare model.generate calls at the PPO rollout batch
    eval_prompts: int
    rounds: int


SIZES = {"full": Size(sft_steps=120, reward_steps=120, dpo_steps=60, ppo_iterations=40, generate_calls=10,
                      eval_prompts=400, rounds=2),
         "smoke": Size(sft_steps=4, reward_steps=4, dpo_steps=3, ppo_iterations=2, generate_calls=2, eval_prompts=16,
                       rounds=1)}
SECTIONS = ("sft", "reward", "dpo", "ppo", "generate", "pipeline")


@dataclass
class World:
    """Where the inputs are: the world's data and its finished base, SFT and reward runs; and where the
    TRL 1.12 environment lives (created on first use)."""

    data: str = "runs/world/data"
    base: str = "runs/world/base"
    sft: str = "runs/world/sft"
    reward: str = "runs/world/reward"
    trl_venv: str = f"runs/bench/trl-{TRL_PPO_VERSION}-venv"

    def args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]


# --- the stages as users run them ---------------------------------------------------------------------


def stage_command(stage: str, w: World, out: Path, steps: int) -> list[str]:
    """`posttrain STAGE recipes/world/STAGE.yaml` on `w`, for `steps` steps, with no evaluation after training
    (the bench times training; the evaluation path has its own section)."""
    # no evaluation, and no path of the recipe left pointing at runs/world (the inputs may be elsewhere)
    sets = {"output_dir": str(out), "eval.prompts": "null", "eval.verifier": "null", "eval.probe": "null"}
    if stage == "sft":
        sets |= {"model.path": w.base, "data.train": f"{w.data}/sft_train.jsonl", "data.eval": "null",
                 "train.max_steps": steps}
    elif stage in ("reward", "dpo"):
        sets |= {"model.path": w.sft, "data.train": f"{w.data}/pref_train.jsonl", "data.eval": "null",
                 "train.max_steps": steps}
        if stage == "reward":
            sets |= {"reward.gold_pairs": 0}
    elif stage == "ppo":
        sets |= {"model.path": w.sft, "data.train": f"{w.data}/ppo_prompts.jsonl", "ppo.reward_model": w.reward,
                 "ppo.verifier": w.data, "ppo.iterations": steps, "train.save_every": steps}
    cmd = [sys.executable, "-m", "posttrain.cli", stage, f"recipes/world/{stage}.yaml", "--force"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def _posttrain_stage(stage: str, w: World, out: Path, steps: int) -> dict:
    run_dir = out / f"run_{stage}"
    cmd = stage_command(stage, w, run_dir, steps)
    _check_call(cmd)
    shown_as = {"command": shlex.join(["posttrain", *cmd[3:]])}  # the stage as a user types it
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    if stage == "ppo":
        return _ppo_times(metrics, _recipe("ppo", w, steps).ppo.rollout_batch_size) | shown_as
    end = next(m for m in metrics if "train_runtime" in m)
    result = {"steps": end["step"], "seconds": end["train_runtime"], "step_s": end["train_runtime"] / end["step"]}
    tokens = max((m["num_tokens"] for m in metrics if "num_tokens" in m), default=None)
    if tokens:
        result["tokens"] = tokens
        result["tokens_per_s"] = tokens / end["train_runtime"]
    for key in ("padding_fraction", "trained_token_fraction", "packing"):
        if key in summary:
            result[key] = summary[key]
    return result | shown_as


def _ppo_times(metrics: list[dict], batch: int) -> dict:
    """Seconds per iteration and per phase, from the second iteration on (the first includes warm-up)."""
    its = [m for m in metrics if "time_generate" in m]
    later = its[1:] or its
    phases = {k: statistics.mean(m[f"time_{k}"] for m in later) for k in ("generate", "score", "forward", "train")}
    return {"iterations": len(its), "iteration_s": sum(phases.values()), **{f"{k}_s": v for k, v in phases.items()},
            "generated_positions": statistics.mean(m["generated_width"] for m in later) * batch}


# --- bare loops: the same model and batches, nothing but forward, loss, backward, AdamW -------------------


def _recipe(stage: str, w: World, steps: int):
    from posttrain.recipe_file import load_recipe

    cmd = stage_command(stage, w, Path("unused"), steps)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    return load_recipe(f"recipes/world/{stage}.yaml", sets, stage=stage)


def _timed_loop(model, batches, loss_fn, lr: float, beta2: float) -> float:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def sft_world(w: World, steps: int):
    """The SFT recipe's model, tokenizer and packed training rows, built the way the stage builds them."""
    from trl.data_utils import pack_dataset

    from posttrain.models import attach_chat_template, load_start_model, load_tokenizer
    from posttrain.render import default_loss
    from posttrain.stages.sft import encode, load_examples

    recipe = _recipe("sft", w, steps)
    rows, fmt = load_examples(recipe, recipe.data.train, None)
    tok = load_tokenizer(recipe.model.path)
    model = load_start_model(recipe.model.path, "float32", tokenizer=tok)
    attach_chat_template(model, tok, recipe.model.chat_template)
    model.config.use_cache = False
    ds, _ = encode(tok, rows, fmt, default_loss(fmt), recipe.data.max_length, recipe.sft.overlong, "train")
    return recipe, rows, tok, model, pack_dataset(ds, recipe.data.max_length, strategy="bfd")


def _sft_bare(w: World, steps: int) -> dict:
    import torch

    from posttrain.stages.sft import PackedRows
    from posttrain.templates import pad_id

    recipe, _, tok, model, packed = sft_world(w, steps)
    torch.manual_seed(0)
    order = torch.randperm(len(packed)).tolist()
    bs, collate = recipe.train.batch_size, PackedRows(pad_id(tok))
    batches, tokens = [], 0
    for k in range(steps):
        idx = [order[(k * bs + j) % len(order)] for j in range(bs)]
        feats = [packed[i] for i in idx]
        tokens += sum(len(f["input_ids"]) for f in feats)
        batches.append(collate(feats))
    seconds = _timed_loop(model, batches, lambda m, b: m(**b, use_cache=False).loss, recipe.train.lr,
                          recipe.train.adam_beta2)
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps, "tokens": tokens,
            "tokens_per_s": tokens / seconds}


def _pairs(stage: str, w: World, steps: int):
    from posttrain.models import load_tokenizer
    from posttrain.preference import fit_length, load_pairs

    recipe = _recipe(stage, w, steps)
    pairs, _ = load_pairs(recipe.data.train)
    tok = load_tokenizer(recipe.model.path)
    kept, _ = fit_length(tok, pairs, recipe.data.max_length, "drop", "train")
    return recipe, tok, pairs, kept


def _pair_batches(kept: list, batch_size: int, steps: int, pad: int):
    """Chosen rows then rejected rows, right-padded to the longest, with the answer tokens marked."""
    import torch

    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(kept), generator=gen).tolist()
    for k in range(steps):
        group = [kept[order[(k * batch_size + j) % len(order)]] for j in range(batch_size)]
        seqs = [(p, c) for p, c, _, _ in group] + [(p, r) for p, _, r, _ in group]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), pad)
        mask, answer = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, a) in enumerate(seqs):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, :len(p) + len(a)] = 1
            answer[i, len(p):len(p) + len(a)] = True
        yield {"input_ids": ids, "attention_mask": mask, "answer": answer}


def _reward_bare(w: World, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from posttrain.models import sequence_classifier
    from posttrain.templates import pad_id

    recipe, tok, _, kept = _pairs("reward", w, steps)
    torch.manual_seed(0)
    model = sequence_classifier(recipe.model.path, "float32", False, tok, num_labels=1)
    batches = list(_pair_batches(kept, recipe.train.batch_size, steps, pad_id(tok)))
    center = recipe.reward.center_rewards or 0.0

    def loss(m, b):
        hidden = m.transformer(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        last = b["attention_mask"].sum(1) - 1
        scores = m.score(hidden[torch.arange(len(last)), last]).squeeze(-1)
        chosen, rejected = scores.chunk(2)
        return -F.logsigmoid(chosen - rejected).mean() + center * ((chosen + rejected) ** 2).mean()

    seconds = _timed_loop(model, batches, loss, recipe.train.lr, recipe.train.adam_beta2)
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps}


def _dpo_bare(w: World, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from posttrain.models import load_start_model
    from posttrain.templates import pad_id

    recipe, tok, _, kept = _pairs("dpo", w, steps)
    model = load_start_model(recipe.model.path, "float32", tokenizer=tok)
    ref = load_start_model(recipe.model.path, "float32", tokenizer=tok).eval().requires_grad_(False)
    batches = list(_pair_batches(kept, recipe.train.batch_size, steps, pad_id(tok)))
    beta, sft_weight = recipe.dpo.beta, recipe.dpo.sft_weight

    def answer_logps(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1]
        lp = torch.gather(logits.log_softmax(-1), 2, b["input_ids"][:, 1:, None]).squeeze(-1)
        keep = b["answer"][:, 1:]
        return (lp * keep).sum(1), keep.sum(1)

    def loss(m, b):
        logps, n = answer_logps(m, b)
        with torch.no_grad():
            ref_logps, _ = answer_logps(ref, b)
        pc, pr = logps.chunk(2)
        rc, rr = ref_logps.chunk(2)
        nll = -(pc.sum() / n.chunk(2)[0].sum())
        return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean() + sft_weight * nll

    seconds = _timed_loop(model, batches, loss, recipe.train.lr, recipe.train.adam_beta2)
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps}


# --- TRL used directly, with its defaults (what a TRL user gets) ---------------------------------------------


def _trl_common(recipe, out: Path, steps: int) -> dict:
    return dict(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=recipe.train.batch_size,
                learning_rate=recipe.train.lr, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                logging_steps=1, disable_tqdm=True, seed=0)


def _trl_result(trainer, steps: int) -> dict:
    metrics = trainer.train().metrics
    seconds = metrics["train_runtime"]
    result = {"steps": steps, "seconds": seconds, "step_s": seconds / steps}
    tokens = max((h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h), default=None)
    if tokens:
        result |= {"tokens": tokens, "tokens_per_s": tokens / seconds}
    return result


def _sft_trl(w: World, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    recipe, rows, tok, model, _ = sft_world(w, steps)
    model.config.use_cache = True  # as a TRL user's model comes
    # max_length: the model has 128 positions; TRL's default of 1024 would index past them
    trainer = SFTTrainer(model=model, args=SFTConfig(**_trl_common(recipe, out, steps), max_length=recipe.data.max_length),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    return _trl_result(trainer, steps)


def _reward_trl(w: World, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from posttrain.models import sequence_classifier

    recipe, tok, pairs, _ = _pairs("reward", w, steps)
    torch.manual_seed(0)
    model = sequence_classifier(recipe.model.path, "float32", False, tok, num_labels=1)
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = RewardTrainer(model=model, args=RewardConfig(**_trl_common(recipe, out, steps)), train_dataset=data,
                            processing_class=tok)
    return _trl_result(trainer, steps)


def _dpo_trl(w: World, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_start_model

    recipe, tok, pairs, _ = _pairs("dpo", w, steps)
    model = load_start_model(recipe.model.path, "float32", tokenizer=tok)
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = DPOTrainer(model=model, args=DPOConfig(**_trl_common(recipe, out, steps)), train_dataset=data,
                         processing_class=tok)
    return _trl_result(trainer, steps)


# --- PPO against TRL 1.12, and generation against bare generate -------------------------------------------


def trl_venv(venv: Path) -> Path:
    """A virtual environment with TRL 1.12 and this environment's torch, transformers, accelerate and
    datasets versions (so only TRL differs), created once. Never the project's own."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    _check_call([sys.executable, "-m", "venv", "--clear", str(venv)])
    pins = [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "accelerate", "datasets")]
    _check_call([str(python), "-m", "pip", "install", "--quiet", f"trl=={TRL_PPO_VERSION}", *pins])
    (venv / ".installed").touch()
    return python


def _ppo_prompts(w: World, steps: int) -> tuple[list[dict], list[list[int]], object]:
    """The prompts `posttrain ppo` trains on, in the order it takes them."""
    from posttrain.models import load_tokenizer
    from posttrain.rewards import load_prompts
    from posttrain.stages.ppo import _prompt_order

    recipe = _recipe("ppo", w, steps)
    tok = load_tokenizer(recipe.model.path)
    rows, ids, _ = load_prompts(recipe.data.train, None, None, tok, recipe.ppo.max_new_tokens, recipe.data.max_length)
    order = _prompt_order(len(rows), steps * recipe.ppo.rollout_batch_size, recipe.seed)
    return [rows[i] for i in order], [ids[i] for i in order], recipe


def _ppo_trl(w: World, steps: int, out: Path) -> dict:
    from posttrain.models import load_tokenizer
    from posttrain.templates import answer_end

    rows, ids, recipe = _ppo_prompts(w, steps)
    p = recipe.ppo
    prompts = out / "trl_ppo_prompts.json"
    prompts.write_text(json.dumps(ids))
    tok = load_tokenizer(recipe.model.path)
    run = out / "trl_ppo"
    _check_call([str(trl_venv(Path(w.trl_venv))), str(ROOT / "scripts" / "bench_trl_ppo.py"), "--policy", w.sft,
                 "--reward", w.reward, "--prompts", str(prompts), "--iterations", str(steps),
                 "--rollout-batch", str(p.rollout_batch_size), "--minibatch", str(p.minibatch_size),
                 "--epochs", str(p.ppo_epochs), "--response-length", str(p.max_new_tokens),
                 "--temperature", str(p.temperature), "--kl-coef", str(p.init_kl_coef), "--lr", str(recipe.train.lr),
                 "--missing-eos-penalty", str(p.no_stop_penalty), "--seed", str(recipe.seed),
                 "--stop-token-id", str(answer_end(tok)), "--out", str(run)])
    got = json.loads((run / "trl_ppo.json").read_text())
    times = got["seconds_per_iteration"]
    return {"iterations": len(times), "iteration_s": statistics.mean(times[1:] or times), "policy": str(run / "policy")}


def _ppo_ours(w: World, steps: int, out: Path) -> dict:
    result = _posttrain_stage("ppo", w, out, steps)
    return result | {"policy": str(out / "run_ppo")}


def gold_of(policy: str, w: World, n: int) -> dict:
    """The gold score of a policy's greedy answers to the first n eval prompts (as compare scores them)."""
    from posttrain import data as datalib
    from posttrain.evaluate import greedy_eval
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.world.verifier import Verifier

    tok = load_tokenizer(policy)
    model = load_causal_lm(policy, "float32", tokenizer=tok)
    rows = datalib.load(f"{w.data}/eval_prompts.jsonl", limit=n).rows
    m = greedy_eval(model, tok, rows, Verifier.from_dir(w.data), 32)
    return {"gold": m["eval_gold"], "prompts": len(rows)}


def _generate_bare(w: World, steps: int) -> dict:
    """Sampled rollouts with a plain model.generate on PPO's first rollout batches (same batch, length and
    sampling settings), timed from the second call on."""
    import torch

    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.ppo import left_pad
    from posttrain.templates import pad_id, stop_ids

    _, ids, recipe = _ppo_prompts(w, steps + 1)
    p, tok = recipe.ppo, load_tokenizer(w.sft)
    model = load_causal_lm(w.sft, "float32", tokenizer=tok).eval()
    torch.manual_seed(0)
    seconds, positions = [], []
    for k in range(steps + 1):
        prompts, mask = left_pad(ids[k * p.rollout_batch_size:(k + 1) * p.rollout_batch_size], pad_id(tok))
        start = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=p.max_new_tokens, do_sample=True,
                                 temperature=p.temperature, top_p=p.top_p, top_k=0, eos_token_id=stop_ids(tok),
                                 pad_token_id=pad_id(tok))
        seconds.append(time.perf_counter() - start)
        positions.append(seq[:, prompts.shape[1]:].numel())
    return {"calls": steps, "tokens_per_s": sum(positions[1:]) / sum(seconds[1:])}


def _eval_rows(w: World, n: int):
    from posttrain import data as datalib
    from posttrain.compare import load_suite
    from posttrain.models import load_causal_lm, load_tokenizer

    suite = load_suite(ROOT / "eval" / "world.yaml")
    rows = datalib.load(f"{w.data}/eval_prompts.jsonl", limit=n).rows
    tok = load_tokenizer(w.sft)
    return rows, suite, tok, load_causal_lm(w.sft, "float32", tokenizer=tok)


def _answer_ours(w: World, n: int) -> dict:
    from posttrain.evaluate import answer

    rows, suite, tok, model = _eval_rows(w, n)
    answer(model, tok, rows[:suite.batch_size], max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size)  # warm-up
    start = time.perf_counter()
    answer(model, tok, rows, max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size)
    seconds = time.perf_counter() - start
    return {"answers": len(rows), "seconds": seconds, "answers_per_s": len(rows) / seconds}


def _answer_bare(w: World, n: int) -> dict:
    """Greedy answers with plain model.generate in file order, left-padded batches of the suite's size."""
    import torch

    from posttrain.ppo import left_pad
    from posttrain.templates import pad_id, prompt_ids, stop_ids

    rows, suite, tok, model = _eval_rows(w, n)
    model.eval()
    ids = [prompt_ids(tok, r["prompt"]) for r in rows]

    def run(chunk):
        prompts, mask = left_pad(chunk, pad_id(tok))
        with torch.no_grad():
            model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=suite.max_new_tokens, do_sample=False,
                           eos_token_id=stop_ids(tok), pad_token_id=pad_id(tok))

    run(ids[:suite.batch_size])  # warm-up
    start = time.perf_counter()
    for b in range(0, len(ids), suite.batch_size):
        run(ids[b:b + suite.batch_size])
    seconds = time.perf_counter() - start
    return {"answers": len(rows), "seconds": seconds, "answers_per_s": len(rows) / seconds}


# --- one contender, in its own process ------------------------------------------------------------------------

CONTENDERS = {
    "sft-posttrain": lambda w, s, out: _posttrain_stage("sft", w, out, s.sft_steps),
    "sft-bare": lambda w, s, out: _sft_bare(w, s.sft_steps),
    "sft-trl": lambda w, s, out: _sft_trl(w, s.sft_steps, out),
    "reward-posttrain": lambda w, s, out: _posttrain_stage("reward", w, out, s.reward_steps),
    "reward-bare": lambda w, s, out: _reward_bare(w, s.reward_steps),
    "reward-trl": lambda w, s, out: _reward_trl(w, s.reward_steps, out),
    "dpo-posttrain": lambda w, s, out: _posttrain_stage("dpo", w, out, s.dpo_steps),
    "dpo-bare": lambda w, s, out: _dpo_bare(w, s.dpo_steps),
    "dpo-trl": lambda w, s, out: _dpo_trl(w, s.dpo_steps, out),
    "ppo-posttrain": lambda w, s, out: _ppo_ours(w, s.ppo_iterations, out),
    "ppo-trl": lambda w, s, out: _ppo_trl(w, s.ppo_iterations, out),
    "generate-bare": lambda w, s, out: _generate_bare(w, s.generate_calls),
    "answer-posttrain": lambda w, s, out: _answer_ours(w, s.eval_prompts),
    "answer-bare": lambda w, s, out: _answer_bare(w, s.eval_prompts),
}
ROUNDS = {  # the contenders of each section, in the order they take turns
    "sft": ["sft-posttrain", "sft-bare", "sft-trl"],
    "reward": ["reward-posttrain", "reward-bare", "reward-trl"],
    "dpo": ["dpo-posttrain", "dpo-bare", "dpo-trl"],
    "ppo": ["ppo-posttrain", "ppo-trl", "generate-bare"],
    "generate": ["answer-posttrain", "answer-bare"],
}


def one_command(name: str, size: str, w: World, out: Path) -> list[str]:
    return [sys.executable, "-m", "posttrain.bench", "one", name, f"--size={size}", *w.args(), f"--out={out}"]


def shown(cmd: list[str]) -> str:
    """A command as a user types it: `python` for this interpreter, default inputs left out."""
    defaults = World().args()
    return shlex.join(["python", *[a for a in cmd[1:] if a not in defaults]])


def _check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))


# --- the report ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    what: str
    ours: float | None
    theirs: float | None
    unit: str
    ratio: float | None = None  # ours / theirs as a speed (>1: posttrain is faster)
    goal: str = ""
    met: bool | None = None
    command: str = ""
    note: str = ""
    runs: dict = field(default_factory=dict)


def _speed_ratio(ours: float | None, theirs: float | None, higher_is_faster: bool) -> float | None:
    if not ours or not theirs:
        return None
    return ours / theirs if higher_is_faster else theirs / ours


def _median(results: list[dict], key: str) -> float | None:
    xs = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def section_rows(section: str, got: dict[str, list[dict]], commands: dict[str, str], w: World) -> list[Row]:
    m = {name: {k: _median(rs, k) for k in rs[0] if isinstance(rs[0][k], (int, float))} for name, rs in got.items()}
    rows: list[Row] = []
    if section == "sft":
        ours = m["sft-posttrain"]
        for base, goal, need in (("sft-bare", "≥ 0.95× the bare loop", 0.95), ("sft-trl", "ahead of TRL's defaults", 1.0)):
            ratio = _speed_ratio(ours["tokens_per_s"], m[base]["tokens_per_s"], True)
            rows.append(Row("sft", f"training tokens/s vs {base.split('-')[1]}", ours["tokens_per_s"],
                            m[base]["tokens_per_s"], "tokens/s", ratio, goal, ratio is not None and ratio >= need,
                            f"{commands['sft-posttrain']}  vs  {commands[base]}"))
        rows.append(Row("sft", "padding fraction / trained-token fraction", ours.get("padding_fraction"),
                        ours.get("trained_token_fraction"), "fraction",
                        note="posttrain's packed batches: share of padding, share of tokens the loss trains on"))
    elif section in ("reward", "dpo"):
        ours = m[f"{section}-posttrain"]
        for base in ("bare", "trl"):
            theirs = m[f"{section}-{base}"]
            rows.append(Row(section, f"seconds per step vs {base}", ours["step_s"], theirs["step_s"], "s/step",
                            _speed_ratio(ours["step_s"], theirs["step_s"], False),
                            command=f"{commands[f'{section}-posttrain']}  vs  {commands[f'{section}-{base}']}"))
    elif section == "ppo":
        ours, trl = m["ppo-posttrain"], m["ppo-trl"]
        ratio = _speed_ratio(ours["iteration_s"], trl["iteration_s"], False)
        policies = {n: got[n][-1]["policy"] for n in ("ppo-posttrain", "ppo-trl")}
        gold = {n: gold_of(p, w, 400) for n, p in policies.items()}
        stderr = (0.25 / gold["ppo-trl"]["prompts"]) ** 0.5  # a proportion's worst-case standard error
        equal = gold["ppo-posttrain"]["gold"] >= gold["ppo-trl"]["gold"] - 2 * stderr
        rows.append(Row("ppo", f"seconds per iteration vs TRL {TRL_PPO_VERSION} PPOTrainer", ours["iteration_s"],
                        trl["iteration_s"], "s/iteration", ratio, "≤ 0.5× TRL's, equal gold",
                        ratio is not None and ratio >= 2.0 and equal,
                        f"{commands['ppo-posttrain']}  vs  {commands['ppo-trl']}",
                        note=f"gold after {int(ours['iterations'])} iterations (greedy, {gold['ppo-trl']['prompts']} "
                             f"eval prompts): posttrain {gold['ppo-posttrain']['gold']:.3f}, TRL "
                             f"{gold['ppo-trl']['gold']:.3f}; per iteration, posttrain's phases: generate "
                             f"{ours['generate_s']:.2f} s, score {ours['score_s']:.2f} s, log-probs and values "
                             f"{ours['forward_s']:.2f} s, optimise {ours['train_s']:.2f} s"))
        ours_tps = ours["generated_positions"] / ours["generate_s"] if ours["generate_s"] else None
        bare = m["generate-bare"]["tokens_per_s"]
        ratio = _speed_ratio(ours_tps, bare, True)
        rows.append(Row("ppo", "rollout generation tokens/s vs bare model.generate", ours_tps, bare, "tokens/s", ratio,
                        "≥ 0.9×", ratio is not None and ratio >= 0.9,
                        f"{commands['ppo-posttrain']}  vs  {commands['generate-bare']}"))
    elif section == "generate":
        ours, bare = m["answer-posttrain"]["answers_per_s"], m["answer-bare"]["answers_per_s"]
        ratio = _speed_ratio(ours, bare, True)
        rows.append(Row("generate", "evaluation answers/s vs bare batched generate", ours, bare, "answers/s", ratio,
                        "≥ 0.9×", ratio is not None and ratio >= 0.9,
                        f"{commands['answer-posttrain']}  vs  {commands['answer-bare']}",
                        note="greedy, the compare suite's batch size and max_new_tokens; posttrain sorts prompts by length"))
    for row in rows:
        row.runs = {n: got[n] for n in got}
    return rows


def pipeline_rows(w: World, rerun: bool) -> list[Row]:
    world = Path(w.sft).parent
    stages = ["base", "sft", "classify", "reward", "dpo", "ppo"]
    seconds = {}
    for s in stages:
        summary = world / s / "summary.json"
        if (world / s / "DONE").exists() and summary.exists():
            seconds[s] = json.loads(summary.read_text()).get("seconds")
    rows = []
    if seconds:
        total = sum(v for v in seconds.values() if v)
        detail = ", ".join(f"{s} {v:.0f} s" for s, v in seconds.items() if v)
        rows.append(Row("pipeline", "stage seconds of the finished pipeline runs", total, None, "s",
                        note=f"{detail} (from each run's summary.json; taken when those runs ran, not in this bench)"))
    if rerun and len(seconds) == len(stages) and (world / "compare" / "DONE").exists():
        start = time.perf_counter()
        _check_call(["make", "pipeline"])
        took = time.perf_counter() - start
        rows.append(Row("pipeline", "a second `make pipeline` on finished runs", took, None, "s", goal="≤ 30 s",
                        met=took <= 30, command="make pipeline"))
    elif rerun:
        rows.append(Row("pipeline", "a second `make pipeline` on finished runs", None, None, "s", goal="≤ 30 s",
                        note=f"not measured: {world} holds no finished pipeline (run `make pipeline` first)"))
    return rows


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(rows: list[Row], info: dict) -> str:
    lines = ["# posttrain bench", "",
             f"{info['date']}, size `{info['size']}`, {info['rounds']} round(s) per section, torch threads "
             f"{info['threads']}, {info['cpu']}. Ratios are speeds (>1: posttrain faster), medians over rounds "
             "taken side by side in this run; absolute figures only as context.", "",
             "| section | measure | posttrain | baseline | unit | ratio | goal | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.section} | {r.what} | {_fmt(r.ours)} | {_fmt(r.theirs)} | {r.unit} | "
                     f"{'' if r.ratio is None else f'{r.ratio:.2f}×'} | {r.goal} | {met} |")
    lines += ["", "## Notes and commands", ""]
    for r in rows:
        if r.note or r.command:
            lines.append(f"- **{r.section}, {r.what}**: {r.note}" + (f"\n  `{r.command}`" if r.command else ""))
    return "\n".join(lines) + "\n"


def bench(size: str, s: Size, w: World, out: Path, sections: list[str]) -> list[Row]:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for section in sections:
        if section == "pipeline":
            rows += pipeline_rows(w, rerun=size == "full")
            continue
        got: dict[str, list[dict]] = {n: [] for n in ROUNDS[section]}
        commands = {}
        for k in range(s.rounds):
            for name in ROUNDS[section]:
                where = out / section / name
                where.mkdir(parents=True, exist_ok=True)
                cmd = one_command(name, size, w, where)
                commands[name] = shown(cmd)
                print(f"bench {section} round {k + 1}/{s.rounds}: {name}", flush=True)
                _check_call(cmd)
                got[name].append(json.loads((where / "result.json").read_text()))
                commands[name] = got[name][-1].get("command", commands[name])  # a stage: its posttrain command
        rows += section_rows(section, got, commands, w)
        for r in rows[-3:]:
            if r.section == section and r.ratio is not None:
                print(f"  {r.what}: {r.ratio:.2f}×", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["all", "one"], default="all")
    parser.add_argument("name", nargs="?", help="with `one`: a contender, e.g. sft-bare")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--rounds", type=int, help="turns per section (default: the size's)")
    for k, v in asdict(World()).items():
        parser.add_argument(f"--{k.replace('_', '-')}", default=v)
    a = parser.parse_args(argv)
    w = World(a.data, a.base, a.sft, a.reward, a.trl_venv)
    out = Path(a.out)
    if a.mode == "one":
        if a.name not in CONTENDERS:
            parser.error(f"unknown contender {a.name!r}; one of {', '.join(CONTENDERS)}")
        out.mkdir(parents=True, exist_ok=True)
        result = CONTENDERS[a.name](w, SIZES[a.size], out)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return 0
    for d in (w.sft, w.reward):
        if not (Path(d) / "DONE").exists():
            print(f"bench: {d} is not a finished run; run `make pipeline` first (or point --sft/--reward elsewhere)",
                  file=sys.stderr)
            return 2
    sections = a.only.split(",") if a.only else list(SECTIONS)
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    import torch

    started = time.time()
    size = SIZES[a.size] if a.rounds is None else replace(SIZES[a.size], rounds=a.rounds)
    rows = bench(a.size, size, w, out, sections)
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "size": a.size, "rounds": size.rounds,
            "threads": torch.get_num_threads(), "cpu": f"{os.cpu_count()} CPU cores", "seconds": time.time() - started}
    (out / "bench.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
    text = render(rows, info)
    (out / "bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
