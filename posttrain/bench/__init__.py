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
            one turn per seed (3 at full size), with the gold score of every policy afterwards (mean,
            range); rollout tokens/s vs a bare model.generate
  generate  answers/s of the evaluation path (compare, the stages' evals) vs a bare batched generate
  pipeline  per-stage seconds of the finished runs in the world folder, and a timed re-run of
            `make pipeline` on them (every stage must skip)

Writes OUT/bench.md and OUT/bench.json (OUT: runs/bench).

Modules: `common` (sizes, the world's inputs, the stage commands, the bare training loop), `stages` (SFT,
reward and DPO: posttrain, bare, TRL), `rl` (PPO against TRL 1.12, bare rollouts), `answers` (the
evaluation path), `report` (rows and the markdown), `__main__` (the contenders, their turns, the CLI).
"""
