"""Group-relative RL on verifiable rewards: GRPO (TRL's GRPOTrainer) or RLOO (TRL's RLOOTrainer).

Reads:  model.path (the starting policy, usually the SFT run; with LoRA also the reference, adapter
        off), data.train (prompts, + the fields the rewards read), data.max_length, grpo.* (algorithm,
        rewards, num_generations, loss_type, beta, epsilon(_high), scale_rewards, num_iterations,
        max_completion_length, temperature, top_p, the hacking monitor), train.* (batch_size counts
        answers per process and step: batch_size / num_generations prompts), eval.*.
Writes: the policy (or its LoRA adapter), eval_answers.jsonl, plots of the logged curves, and the
        usual run files; checkpoints every train.save_every steps for resume.
Reports: per step each reward's mean and std, the share of groups whose answers all scored the same
        (frac_reward_zero_std: no learning signal from them), KL to the reference, clip ratios,
        answer length, greedy gold metrics every grpo.eval_every steps; at the end the gold metrics,
        KL to the reference, and, with a reward model and the gold verifier, reward hacking.

Each prompt is answered num_generations times and each answer's advantage is its reward against its
group's (GRPO: minus the group mean, over a std; RLOO: minus the mean of the others). Answers are
sampled with a random stream each (posttrain/sampling.py), so 1 and N processes, or a resumed run
and an uninterrupted one, draw the same answers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from posttrain import data as datalib
from posttrain import rewards as rewardlib
from posttrain.errors import UserError
from posttrain.evaluate import evaluate_prompts, greedy_eval, kl_summary, policy_kl
from posttrain.models import check_max_length, expose_head_bias, load_start_model, load_tokenizer, lora_config
from posttrain.monitor import check_history
from posttrain.recipe import GrpoRecipe
from posttrain.runs import Curve, Run
from posttrain.sampling import answer_seed, position_ids_from, sample
from posttrain.sharding import trainer_weights, unshard
from posttrain.templates import pad_id, stop_ids
from posttrain.training import build_trainer, fit, trainer_kwargs


def seeded_sampling(trainer_cls: type) -> type:
    """`trainer_cls` whose answers come from posttrain.sampling (a random stream per answer) instead of
    one stream per batch, vLLM generation left as TRL does it; and whose log-probs are taken at the
    positions the answers were sampled at (TRL's forward passes none, so with left-padded prompts an
    absolute-position model such as GPT-2 is scored at positions shifted by each row's padding: the
    first update is off-policy, and since padding is per process, N processes train another model
    than one process did)."""

    class Seeded(trainer_cls):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kwargs):
            return super()._get_per_token_logps_and_entropies(
                _AtSampledPositions(model), input_ids, attention_mask, *args, **kwargs)

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            if self.use_vllm:
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            first = self.accelerator.process_index * len(prompt_ids)  # this process's place in the global batch
            seeds = [answer_seed(self.args.seed, self.state.global_step, first + i) for i in range(len(prompt_ids))]
            model = self.accelerator.unwrap_model(self.model)
            with trainer_weights(self):  # sharded: gathered once for the whole batch of answers, not per token
                ids = sample(model, prompt_ids, seeds, stop_ids=self.eos_token_ids, pad_id=pad_id(self._tokenizer),
                             max_new_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
                             top_k=self.top_k or 0)
            return ids if trainer_cls.__name__ == "RLOOTrainer" else (ids, None)

    Seeded.__name__ = Seeded.__qualname__ = trainer_cls.__name__
    return Seeded


class _AtSampledPositions:
    """`model` called with the position ids that `generate` used for the same attention mask."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        return self.model(**inputs, position_ids=position_ids_from(inputs["attention_mask"]))


class RewardAliases(TrainerCallback):
    """Log the gold and reward-model means also as `gold` and `proxy` (what the hacking monitor, the
    progress line and `compare` read for every online run, PPO's included), and every `every` steps
    the greedy eval metrics of `evaluate(model)` on a line of their own."""

    def __init__(self, run: Run, gold: str | None, proxy: str | None, every: int, evaluate):
        self.run, self.gold, self.proxy, self.every, self.evaluate = run, gold, proxy, every, evaluate
        self.trainer = None  # set once built: a sharded model is gathered by every process for the evaluation

    def on_log(self, args, state, control, logs=None, **kw):
        for alias, name in (("gold", self.gold), ("proxy", self.proxy)):
            if name and logs is not None and f"rewards/{name}/mean" in logs:
                logs[alias] = logs[f"rewards/{name}/mean"]

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.evaluate is not None and state.global_step % self.every == 0:
            with trainer_weights(self.trainer):
                if self.run.is_main:
                    self.run.log(state.global_step, self.evaluate(self.trainer.accelerator.unwrap_model(self.trainer.model)))


def main(recipe: GrpoRecipe, force: bool = False) -> Path:
    g = recipe.grpo
    if g.vllm and not torch.cuda.is_available():
        raise UserError("grpo.vllm: vLLM generation needs a CUDA GPU and this machine has none; set grpo.vllm: false")
    if g.vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("grpo.vllm: the vllm package is not installed; `pip install vllm`, or set grpo.vllm: false")
    from accelerate import PartialState

    processes = PartialState().num_processes
    answers = recipe.train.batch_size * processes * recipe.train.grad_accum
    if answers % g.num_generations:
        raise UserError(f"grpo.num_generations: {g.num_generations} does not divide the {answers} answers generated per "
                        f"step (train.batch_size {recipe.train.batch_size} x {processes} process(es) x train.grad_accum "
                        f"{recipe.train.grad_accum}); make train.batch_size a multiple of it")
    tok = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
    rows, _, dropped = rewardlib.load_prompts(
        recipe.data.train, recipe.data.columns, recipe.data.limit, tok, g.max_completion_length, recipe.data.max_length,
        overlong="drop", need=rewardlib.fields_needed(g.rewards), key="grpo.max_completion_length",
        prompt_field=g.prompt_field)
    if dropped:
        print(f"note: {dropped} prompts leave fewer than grpo.max_completion_length={g.max_completion_length} of "
              f"data.max_length={recipe.data.max_length} tokens for the answer: dropped")
    policy = load_start_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code, tokenizer=tok)
    check_max_length(policy, recipe.data.max_length)
    stops = stop_ids(tok)
    policy.generation_config.eos_token_id = stops  # TRL stops (and counts truncation) at these

    # A reward model is standardised on the starting policy's own sampled answers, as PPO does.
    scorers: dict[str, tuple] = {}

    def scorer_for(path: str):
        from posttrain.preference import RewardScorer

        scorer = RewardScorer.load(path, PartialState().device)
        norm = rewardlib.proxy_norm(scorer, policy, tok, rows[:64], g.max_completion_length, g.temperature, recipe.seed)
        scorers[path] = (scorer, norm)
        return scorer, norm

    reward_fns = rewardlib.build(g.rewards, stops, scorer_for, group=g.num_generations)
    gold = next((r for r in g.rewards if r.source == "gold"), None)
    proxy = next((r for r in g.rewards if r.source == "reward_model"), None)
    eval_rows = datalib.load(recipe.eval.prompts, limit=recipe.eval.limit).rows if recipe.eval.prompts else []
    watch = None  # greedy gold metrics during training: eval prompts and a verifier (eval's, else the gold reward's)
    world = recipe.eval.verifier or (gold.path if gold else None)
    if world and eval_rows:
        from posttrain.world.verifier import Verifier

        verifier = Verifier.from_dir(world)
        scorer, norm = scorers.get(proxy.path, (None, (0.0, 1.0))) if proxy else (None, (0.0, 1.0))

        def watch(model):
            return greedy_eval(model, tok, eval_rows[:128], verifier, g.max_completion_length, scorer, norm)

    run = Run(recipe).start(force)
    config_cls, trainer_cls = _trl(g.algorithm)
    knobs = dict(num_generations=g.num_generations, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                 num_iterations=g.num_iterations, max_completion_length=g.max_completion_length,
                 temperature=g.temperature, top_p=g.top_p, mask_truncated_completions=g.mask_truncated_completions,
                 reward_weights=[r.weight for r in g.rewards], use_vllm=g.vllm, disable_dropout=True,
                 log_completions=False, remove_unused_columns=False)
    if g.vllm:
        knobs["vllm_mode"] = "colocate"
    if g.algorithm == "grpo":
        knobs.update(loss_type=g.loss_type, scale_rewards=g.scale_rewards)
    else:
        knobs["normalize_advantages"] = g.scale_rewards != "none"
    args = config_cls(**trainer_kwargs(recipe, run, **knobs))
    aliases = RewardAliases(run, gold.label if gold else None, proxy.label if proxy else None, g.eval_every, watch)
    trainer = build_trainer(
        seeded_sampling(trainer_cls), run, model=policy, reward_funcs=reward_fns, args=args,
        train_dataset=_dataset(rows, tok), processing_class=tok, callbacks=[aliases],
        peft_config=lora_config(recipe.model.lora, "CAUSAL_LM") if recipe.model.lora else None)
    trainer.eos_token_ids = stops
    aliases.trainer = trainer
    if recipe.model.lora:
        expose_head_bias(trainer.model)
    fit(trainer, run)
    unshard(trainer, run)  # sharded: the main process gets the whole trained policy as trainer.model
    if not run.is_main:
        return run.dir

    history = run.metrics()
    steps = trainer.state.global_step
    summary: dict = {"algorithm": g.algorithm, "steps": steps, "prompts": len(rows), "prompts_dropped": dropped,
                     "answers_sampled": steps * answers // g.num_iterations,  # each batch serves num_iterations steps
                     "num_generations": g.num_generations, "loss_type": g.loss_type if g.algorithm == "grpo" else "rloo",
                     "beta": g.beta, "lora": recipe.model.lora is not None,
                     "reward": " + ".join(f"{r.weight:g} x {r.label}" for r in g.rewards)}
    for _, (mu, sigma) in scorers.values():
        summary["proxy_norm_mean"], summary["proxy_norm_std"] = mu, sigma
    train_rows = [h for h in history if "reward" in h]
    last = train_rows[-min(len(train_rows), 5):]
    for key, name in (("reward", "reward"), ("gold", "gold"), ("proxy", "proxy"), ("kl", "kl"),
                      ("frac_reward_zero_std", "zero_std_share"), ("completions/mean_length", "response_length"),
                      ("completions/clipped_ratio", "truncated_rate")):
        if last and all(key in h for h in last):
            summary[f"final_{name}"] = sum(h[key] for h in last) / len(last)
    if train_rows:
        summary["mean_zero_std_share"] = sum(h.get("frac_reward_zero_std", 0) for h in train_rows) / len(train_rows)
    if proxy is not None and gold is not None:
        watched = [h for h in history if "proxy" in h and "gold" in h]  # one row per logged step (logging.every)
        check = check_history(watched, g.monitor)
        summary["reward_hacking"] = check.flagged
        summary["reward_hacking_iteration"] = watched[check.iteration]["step"] if check.flagged else None
        summary["reward_hacking_reason"] = check.reason
        if check.flagged:
            print(f"REWARD HACKING at step {summary['reward_hacking_iteration']}: {check.reason}")
    model = trainer.model
    if recipe.eval.prompts:
        result = evaluate_prompts(model, tok, recipe.eval, run.dir)
        summary.update(result.metrics)
        # the verifiable rewards on the greedy eval answers, where the eval prompts carry their fields
        texts, stopped = [g.text for g in result.gens], [g.stopped for g in result.gens]
        for fn in reward_fns:
            if isinstance(fn, (rewardlib.Match, rewardlib.Format)) and all(
                    getattr(fn, "field", None) is None or r.get(fn.field) is not None for r in result.rows):
                scores = fn.score(result.rows, texts, stopped)
                summary[f"eval_{fn.__name__}"] = sum(scores) / len(scores)
        ref = None if recipe.model.lora else load_start_model(recipe.model.path, "float32", tokenizer=tok)
        summary.update(kl_summary(policy_kl(
            model, ref, tok, result.rows, max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
            seed=recipe.seed)))
    notes = (f"`{recipe.model.path}` optimised with {g.algorithm.upper()} for {steps} steps "
             f"({g.num_generations} answers per prompt) against {summary['reward']}.")
    return run.finish(summary, title=f"{g.algorithm.upper()} policy", notes=notes, save=trainer.save_model,
                      tokenizer=tok, curves=CURVES + _reward_curves(g))


def _trl(algorithm: str) -> tuple[type, type]:
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, RLOOTrainer


def _dataset(rows: list[dict], tok) -> Dataset:
    """TRL's prompt dataset: a chat prompt for a model with a chat template (TRL applies it), plain
    text otherwise; every other field goes to the rewards as a column (None where a row lacks it)."""
    keys = sorted({k for r in rows for k in r} - {"prompt", "completion", "completion_ids"})
    out = []
    for r in rows:
        prompt = r["prompt"]
        if tok.chat_template and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        out.append({"prompt": prompt, **{k: _plain(r.get(k)) for k in keys}})
    return Dataset.from_list(out)


def _plain(value):
    """Columns of mixed types (a number here, text there) would not make one Arrow column: text them."""
    return None if value is None else value if isinstance(value, str) else str(value)


def _reward_curves(g) -> list[Curve]:
    keys = [f"rewards/{r.label}/mean" for r in g.rewards]
    return [Curve(keys, "rewards.png", "each reward's mean over the step's answers")]


CURVES = [
    Curve(["reward", "gold", "proxy", "eval_gold", "eval_proxy"], "reward.png", "reward (optimised), gold and proxy"),
    Curve(["frac_reward_zero_std"], "zero_std.png", "share of groups whose answers all scored the same (no signal)"),
    Curve(["kl"], "kl.png", "KL to the reference (per token)"),
    Curve(["clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy"], "policy.png", "policy update"),
    Curve(["completions/mean_length", "completions/clipped_ratio"], "length.png", "answers"),
]
