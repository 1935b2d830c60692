"""SFT, reward and DPO: each stage's bare loop (the same model and batches, nothing but forward, loss,
backward, AdamW) and TRL's trainer with its defaults (what a TRL user gets). posttrain's own stage runs
through `common.posttrain_stage`."""

from __future__ import annotations

from pathlib import Path

from posttrain.bench.common import World, recipe_for, timed_loop


def sft_world(w: World, steps: int):
    """The SFT recipe's model, tokenizer and packed training rows, built the way the stage builds them."""
    from trl.data_utils import pack_dataset

    from posttrain.models import attach_chat_template, load_start_model, load_tokenizer
    from posttrain.render import default_loss
    from posttrain.stages.sft import encode, load_examples

    recipe = recipe_for("sft", w, steps)
    rows, fmt = load_examples(recipe, recipe.data.train, None)
    tok = load_tokenizer(recipe.model.path)
    model = load_start_model(recipe.model.path, "float32", tokenizer=tok)
    attach_chat_template(model, tok, recipe.model.chat_template)
    model.config.use_cache = False
    ds, _ = encode(tok, rows, fmt, default_loss(fmt), recipe.data.max_length, recipe.sft.overlong, "train")
    return recipe, rows, tok, model, pack_dataset(ds, recipe.data.max_length, strategy="bfd")


def sft_bare(w: World, steps: int) -> dict:
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
    seconds = timed_loop(model, batches, lambda m, b: m(**b, use_cache=False).loss, recipe.train.lr,
                          recipe.train.adam_beta2)
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps, "tokens": tokens,
            "tokens_per_s": tokens / seconds}


def _pairs(stage: str, w: World, steps: int):
    from posttrain.models import load_tokenizer
    from posttrain.preference import fit_length, load_pairs

    recipe = recipe_for(stage, w, steps)
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


def reward_bare(w: World, steps: int) -> dict:
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

    seconds = timed_loop(model, batches, loss, recipe.train.lr, recipe.train.adam_beta2)
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps}


def dpo_bare(w: World, steps: int) -> dict:
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

    seconds = timed_loop(model, batches, loss, recipe.train.lr, recipe.train.adam_beta2)
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps}


# --- TRL used directly, with its defaults (what a TRL user gets) ---------------------------------------------

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


def sft_trl(w: World, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    recipe, rows, tok, model, _ = sft_world(w, steps)
    model.config.use_cache = True  # as a TRL user's model comes
    # max_length: the model has 128 positions; TRL's default of 1024 would index past them
    trainer = SFTTrainer(model=model, args=SFTConfig(**_trl_common(recipe, out, steps), max_length=recipe.data.max_length),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    return _trl_result(trainer, steps)


def reward_trl(w: World, steps: int, out: Path) -> dict:
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


def dpo_trl(w: World, steps: int, out: Path) -> dict:
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
