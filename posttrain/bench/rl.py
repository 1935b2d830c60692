"""PPO against TRL 1.12's PPOTrainer (in its own virtual environment), the gold score of the policies
both train, and rollouts by a bare model.generate."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from posttrain.bench.common import ROOT, TRL_PPO_VERSION, World, check_call, posttrain_stage, recipe_for


def trl_venv(venv: Path) -> Path:
    """A virtual environment with TRL 1.12 and this environment's torch, transformers, accelerate and
    datasets versions (so only TRL differs), created once. Never the project's own."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    check_call([sys.executable, "-m", "venv", "--clear", str(venv)])
    pins = [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "accelerate", "datasets")]
    check_call([str(python), "-m", "pip", "install", "--quiet", f"trl=={TRL_PPO_VERSION}", *pins])
    (venv / ".installed").touch()
    return python


def seed_of(w: World, steps: int, offset: int) -> int:
    """The PPO recipe's seed moved by `offset`: the bench's turn k runs both PPOs with seed + k."""
    return recipe_for("ppo", w, steps).seed + offset


def _ppo_prompts(w: World, steps: int, seed: int | None = None) -> tuple[list[dict], list[list[int]], object]:
    """The prompts `posttrain ppo` trains on with `seed`, in the order it takes them."""
    from posttrain.models import load_tokenizer
    from posttrain.rewards import load_prompts
    from posttrain.stages.ppo import _prompt_order

    recipe = recipe_for("ppo", w, steps, seed)
    tok = load_tokenizer(recipe.model.path)
    rows, ids, _ = load_prompts(recipe.data.train, None, None, tok, recipe.ppo.max_new_tokens, recipe.data.max_length)
    order = _prompt_order(len(rows), steps * recipe.ppo.rollout_batch_size, recipe.seed)
    return [rows[i] for i in order], [ids[i] for i in order], recipe


def ppo_trl(w: World, steps: int, out: Path, offset: int = 0) -> dict:
    """TRL 1.12's PPOTrainer on the prompts posttrain takes, in its order, at posttrain's settings; then the
    gold of its policy (untimed)."""
    from posttrain.models import load_tokenizer
    from posttrain.templates import answer_end

    rows, ids, recipe = _ppo_prompts(w, steps, seed_of(w, steps, offset))
    p = recipe.ppo
    prompts = out / "trl_ppo_prompts.json"
    prompts.write_text(json.dumps(ids))
    tok = load_tokenizer(recipe.model.path)
    run = out / "trl_ppo"
    check_call([str(trl_venv(Path(w.trl_venv))), str(ROOT / "scripts" / "bench_trl_ppo.py"), "--policy", w.sft,
                 "--reward", w.reward, "--prompts", str(prompts), "--iterations", str(steps),
                 "--rollout-batch", str(p.rollout_batch_size), "--minibatch", str(p.minibatch_size),
                 "--epochs", str(p.ppo_epochs), "--response-length", str(p.max_new_tokens),
                 "--temperature", str(p.temperature), "--kl-coef", str(p.init_kl_coef), "--lr", str(recipe.train.lr),
                 "--missing-eos-penalty", str(p.no_stop_penalty), "--seed", str(recipe.seed),
                 "--stop-token-id", str(answer_end(tok)), "--out", str(run)])
    got = json.loads((run / "trl_ppo.json").read_text())
    times = got["seconds_per_iteration"]
    return {"iterations": len(times), "iteration_s": statistics.mean(times[1:] or times), "seed": recipe.seed,
            "policy": str(run / "policy"), **gold_of(str(run / "policy"), w, GOLD_PROMPTS)}


def ppo_ours(w: World, steps: int, out: Path, offset: int = 0) -> dict:
    seed = seed_of(w, steps, offset)
    result = posttrain_stage("ppo", w, out, steps, seed)
    return result | {"seed": seed, "policy": str(out / "run_ppo"), **gold_of(str(out / "run_ppo"), w, GOLD_PROMPTS)}


GOLD_PROMPTS = 400  # eval prompts each PPO policy answers greedily for its gold score


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


def generate_bare(w: World, steps: int) -> dict:
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
