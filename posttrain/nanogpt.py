"""nanoGPT checkpoints as Hugging Face GPT-2 models, with the logits checked against nanoGPT's own math.

nanoGPT's `train.py` saves `{"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size,
bias, vocab_size, dropout}, ...}`. Its model is GPT-2 with three differences that the import handles:

- Layout. Its linear layers are `nn.Linear` (weight: out x in); Hugging Face GPT-2 uses `Conv1D`
  (weight: in x out), so `c_attn`, `c_proj` and `c_fc` weights are transposed. Names are otherwise
  the same; a `_orig_mod.` prefix left by `torch.compile` is dropped, and so are the causal-mask
  buffers (`attn.bias`, 1x1xTxT) that nanoGPT keeps when flash attention is off.
- Vocabulary. nanoGPT pads the vocabulary to a multiple of 64 (50304 for GPT-2's 50257) for speed.
  No token id ever selects the extra rows, so they are cut to the tokenizer's size; the logits of the
  real tokens are unchanged. A checkpoint with fewer rows than the tokenizer has tokens was trained
  with another tokenizer, and is refused.
- Biases. With `bias=False` nanoGPT has no biases in linear and LayerNorm layers; Hugging Face GPT-2
  always has them, so they are zeros, which computes the same function.

The embedding and the output layer are tied in both (`lm_head.weight` is `transformer.wte.weight`).
nanoGPT's GELU is the exact one (`activation_function="gelu"`, not GPT-2's default tanh approximation).

Verification: `forward()` below is nanoGPT's forward pass written as plain functions on the
checkpoint's tensors. The imported model, reloaded from disk, must give the same logits on sample
inputs (`torch.allclose`, fp32, atol=rtol=1e-4: logits of a real GPT-2 reach ~100 in magnitude, where
fp32 round-off alone is ~1e-5), and its parameter count must equal the checkpoint's exactly, after
the cut rows and the added zero biases are accounted for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from posttrain.errors import UserError
from posttrain.runs import atomic_dir, check_output_dir
from posttrain.templates import pad_id

ATOL = RTOL = 1e-4
ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
# nn.Linear (out x in) in nanoGPT, Conv1D (in x out) in Hugging Face.
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PREFIX = "_orig_mod."
# What the `import-nanogpt` command writes besides the model and tokenizer files.


@dataclass
class Checkpoint:
    path: Path
    args: dict  # model_args, with bias and dropout defaulted as in nanoGPT's GPTConfig
    state: dict[str, torch.Tensor]  # nanoGPT names, fp32, no prefix, no mask buffers


# --- reading and checking ----------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a nanoGPT checkpoint safely (`weights_only=True`) and check its keys and shapes against
    its model_args. Raises UserError naming the file and the first problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    from posttrain.pickles import load_weights_only

    raw = load_weights_only(path, "checkpoint", "posttrain loads only tensors and plain values (torch.load "
                            "weights_only=True); re-save it with torch.save({'model': model.state_dict(), "
                            "'model_args': dict(...)})")
    if not isinstance(raw, dict) or "model" not in raw or "model_args" not in raw:
        found = f"keys {sorted(map(str, raw))[:6]}" if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{path}: not a nanoGPT checkpoint (found {found}); expected a dict with 'model' (the state "
                        "dict) and 'model_args' (n_layer, n_head, n_embd, block_size, vocab_size, bias), as nanoGPT's "
                        "train.py saves")
    args = _check_args(path, raw["model_args"])
    state = raw["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: 'model' must be a state dict of tensors")
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: weight {bad} holds NaN or inf values; import a checkpoint saved before training diverged")
    # The causal mask nanoGPT registers when flash attention is off: a constant, not a weight.
    state = {k: v for k, v in state.items() if not _is_mask(k, v)}
    expected = expected_shapes(args)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = [f"missing {_some(missing)}" if missing else "", f"unexpected {_some(extra)}" if extra else ""]
        bias_hint = f" (model_args has bias={args['bias']})" if any(k.endswith(".bias") for k in missing + extra) else ""
        raise UserError(f"{path}: state dict does not match model_args{bias_hint}: "
                        f"{'; '.join(p for p in parts if p)}; was it saved from a nanoGPT model with these model_args?")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise UserError(f"{path}: {k} has shape {tuple(state[k].shape)} but model_args "
                            f"(n_embd={args['n_embd']}, vocab_size={args['vocab_size']}, block_size={args['block_size']}) "
                            f"need {shape}; fix model_args or the checkpoint")
    if not all(v.is_floating_point() for v in state.values()):
        raise UserError(f"{path}: every weight must be a floating-point tensor")
    return Checkpoint(path, args, {k: state[k].float() for k in expected})


def _check_args(path: Path, model_args) -> dict:
    if not isinstance(model_args, dict):
        raise UserError(f"{path}: model_args must be a dict, got {type(model_args).__name__}")
    missing = [k for k in ARGS if k not in model_args]
    if missing:
        raise UserError(f"{path}: model_args lacks {', '.join(missing)}; nanoGPT's model_args has {', '.join(ARGS)}, bias")
    args = {"bias": True, "dropout": 0.0, **model_args}  # nanoGPT's GPTConfig defaults
    for k in ARGS:
        if not isinstance(args[k], int) or isinstance(args[k], bool) or args[k] <= 0:
            raise UserError(f"{path}: model_args {k} must be a positive integer, got {args[k]!r}")
    if args["n_embd"] % args["n_head"]:
        raise UserError(f"{path}: model_args n_embd ({args['n_embd']}) is not divisible by n_head ({args['n_head']})")
    if not isinstance(args["bias"], bool):
        raise UserError(f"{path}: model_args bias must be true or false, got {args['bias']!r}")
    return args


def expected_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a nanoGPT model with these model_args, in nanoGPT's names and layouts."""
    c, v = args["n_embd"], args["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, c), "transformer.wpe.weight": (args["block_size"], c)}
    layer = {"ln_1": (c,), "attn.c_attn": (3 * c, c), "attn.c_proj": (c, c), "ln_2": (c,),
             "mlp.c_fc": (4 * c, c), "mlp.c_proj": (c, 4 * c)}
    for i in range(args["n_layer"]):
        for name, w in layer.items():
            shapes[f"transformer.h.{i}.{name}.weight"] = w
            if args["bias"]:
                shapes[f"transformer.h.{i}.{name}.bias"] = (w[0],)
    shapes["transformer.ln_f.weight"] = (c,)
    if args["bias"]:
        shapes["transformer.ln_f.bias"] = (c,)
    shapes["lm_head.weight"] = (v, c)
    return shapes


def _is_mask(key: str, value: torch.Tensor) -> bool:
    return key.endswith(".attn.bias") and value.dim() == 4


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --- nanoGPT's forward pass, the reference -------------------------------------------------------


@torch.no_grad()
def forward(state: dict[str, torch.Tensor], args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward (eval mode, all positions) on its own state dict: (B, T) ids -> (B, T, vocab) logits."""
    B, T = idx.shape
    C, nh = args["n_embd"], args["n_head"]

    def ln(x, name):
        return F.layer_norm(x, (C,), state[f"{name}.weight"], state.get(f"{name}.bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))

    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:T]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}"
        q, k, v = linear(ln(x, f"{h}.ln_1"), f"{h}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + linear(y, f"{h}.attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")), f"{h}.mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), state["lm_head.weight"])


# --- conversion ----------------------------------------------------------------------------------


def to_hf(ckpt: Checkpoint, tokenizer):
    """The Hugging Face GPT2LMHeadModel with the checkpoint's weights, its vocabulary cut to the tokenizer's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    a, vocab = ckpt.args, len(tokenizer)
    if a["vocab_size"] < vocab:
        raise UserError(f"{ckpt.path}: the model has {a['vocab_size']} token rows but the tokenizer has {vocab} tokens, "
                        "so the checkpoint was trained with another tokenizer; pass --tokenizer DIR with that "
                        "tokenizer (encoder.json + vocab.bpe, or a Hugging Face tokenizer directory)")
    tied = torch.equal(ckpt.state["lm_head.weight"], ckpt.state["transformer.wte.weight"])
    config = GPT2Config(
        vocab_size=vocab, n_positions=a["block_size"], n_embd=a["n_embd"], n_layer=a["n_layer"], n_head=a["n_head"],
        activation_function="gelu", layer_norm_epsilon=1e-5, tie_word_embeddings=tied,
        resid_pdrop=a["dropout"], embd_pdrop=a["dropout"], attn_pdrop=a["dropout"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    hf = {}
    for name, p in model.state_dict().items():
        src = ckpt.state.get(name)
        if src is None:  # a bias nanoGPT ran without (bias=False): zeros compute the same function
            hf[name] = torch.zeros_like(p)
        elif name.endswith(TRANSPOSED):
            hf[name] = src.t()
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            hf[name] = src[:vocab]
        else:
            hf[name] = src
    model.load_state_dict(hf, strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id(tokenizer)
    return model.eval()


def parameter_counts(ckpt: Checkpoint, model) -> dict:
    """Parameters on each side, tied weights counted once, and the accounting that must make them equal."""
    a = ckpt.args
    tied = torch.equal(ckpt.state["lm_head.weight"], ckpt.state["transformer.wte.weight"])
    nano = sum(v.numel() for k, v in ckpt.state.items() if not (tied and k == "lm_head.weight"))
    cut = (a["vocab_size"] - model.config.vocab_size) * a["n_embd"] * (1 if tied else 2)
    # bias=False: 6 zero biases per block (ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj) = 11 x n_embd, + ln_f's
    zeros = 0 if a["bias"] else (11 * a["n_layer"] + 1) * a["n_embd"]
    hf = sum(p.numel() for p in model.parameters())
    return {"params_nanogpt": nano, "params_hf": hf, "params_cut_vocab": cut, "params_zero_bias": zeros,
            "params_match": hf == nano - cut + zeros}


@torch.no_grad()
def compare_logits(ckpt: Checkpoint, model, tokenizer, seed: int = 0) -> dict:
    """Max |logit difference| between nanoGPT's forward and the HF model on sample inputs."""
    vocab = model.config.vocab_size
    T = min(ckpt.args["block_size"], 256)
    g = torch.Generator().manual_seed(seed)
    text = tokenizer.encode("Hello, I'm a language model, and this is a check of my weights.")[:T]
    samples = [torch.randint(0, vocab, (2, T), generator=g), torch.tensor([text])]
    worst, ok = 0.0, True
    for idx in samples:
        ref = forward(ckpt.state, ckpt.args, idx)[..., :vocab]
        out = model(input_ids=idx).logits.float()
        worst = max(worst, (out - ref).abs().max().item())
        ok = ok and torch.allclose(out, ref, atol=ATOL, rtol=RTOL)
    return {"max_abs_logit_diff": worst, "logits_match": ok, "positions_checked": sum(s.numel() for s in samples)}


def verify(ckpt: Checkpoint, model, tokenizer, show: bool = False) -> dict:
    """Both checks (printed when `show`); raises UserError if either fails."""
    report = {**compare_logits(ckpt, model, tokenizer), **parameter_counts(ckpt, model)}
    if show:
        print(f"logits: max |HF - nanoGPT| = {report['max_abs_logit_diff']:.3g} over {report['positions_checked']} "
              f"positions (allclose atol={ATOL}, rtol={RTOL}): {'ok' if report['logits_match'] else 'FAILED'}")
        adjust = "".join([f" - {report['params_cut_vocab']:,} (cut vocab rows)" if report["params_cut_vocab"] else "",
                          f" + {report['params_zero_bias']:,} (zero biases)" if report["params_zero_bias"] else ""])
        print(f"parameters: nanoGPT {report['params_nanogpt']:,}{adjust} = Hugging Face {report['params_hf']:,}: "
              f"{'ok' if report['params_match'] else 'FAILED'}")
    if not report["logits_match"]:
        raise UserError(f"{ckpt.path}: the imported model's logits differ from nanoGPT's by up to "
                        f"{report['max_abs_logit_diff']:.3g} (allowed: atol={ATOL}, rtol={RTOL}); the checkpoint may "
                        "not be a standard nanoGPT model (a changed architecture?)")
    if not report["params_match"]:
        raise UserError(f"{ckpt.path}: parameter counts differ: nanoGPT {report['params_nanogpt']:,}, Hugging Face "
                        f"{report['params_hf']:,} (expected {report['params_nanogpt'] - report['params_cut_vocab'] + report['params_zero_bias']:,})")
    return report


def _tokenizer(tokenizer: str | None, block_size: int):
    from posttrain.gpt2_tokenizer import gpt2_tokenizer, load_tokenizer

    tok = gpt2_tokenizer() if tokenizer is None else load_tokenizer(tokenizer)
    tok.model_max_length = block_size
    return tok


def load_nanogpt(path: str | Path, tokenizer: str | None = None):
    """A nanoGPT `.pt` as (GPT2LMHeadModel, tokenizer), verified against nanoGPT's forward pass.

    `tokenizer`: a directory (encoder.json + vocab.bpe, vocab.json + merges.txt, or a Hugging Face
    tokenizer); default: GPT-2's, from the packaged files."""
    ckpt = read_checkpoint(path)
    tok = _tokenizer(tokenizer, ckpt.args["block_size"])
    model = to_hf(ckpt, tok)
    verify(ckpt, model, tok)
    return model, tok


# --- the import-nanogpt command ------------------------------------------------------------------


def import_nanogpt(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | None = None, force: bool = False) -> Path:
    """Convert, save, reload from disk, verify, then write summary.json, README.md and DONE (last)."""
    from transformers import AutoModelForCausalLM

    started = time.time()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another output directory")
    # not under a file, writable, and never someone else's files: only an earlier import is replaced
    check_output_dir(out, "OUT_DIR", lambda d: (d / "summary.json").exists() and not (d / "recipe.yaml").exists(),
                     "an earlier import")
    if out.is_dir() and any(out.iterdir()) and not force:
        state = "a finished import (DONE)" if (out / "DONE").exists() else "files"
        raise UserError(f"{out} already holds {state}; pass --force to overwrite it or choose another output directory")
    ckpt = read_checkpoint(checkpoint)
    a = ckpt.args
    tok = _tokenizer(tokenizer, a["block_size"])
    model = to_hf(ckpt, tok)
    vocab = model.config.vocab_size
    print(f"nanoGPT {ckpt.path}: {a['n_layer']} layers, {a['n_head']} heads, n_embd {a['n_embd']}, "
          f"block_size {a['block_size']}, bias={a['bias']}, vocab {a['vocab_size']}")
    if a["vocab_size"] > vocab:
        print(f"vocab: the checkpoint has {a['vocab_size']} rows (padded); keeping the tokenizer's {vocab} and "
              f"dropping {a['vocab_size'] - vocab} rows that no token id uses")
    if not a["bias"]:
        print("bias=False: Hugging Face GPT-2 always has biases; they are zeros")

    # Written into a staging directory that becomes OUT_DIR only once verified: a failed import leaves
    # nothing behind (and --force replaces an earlier import only then).
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        # Verify what is on disk, not the object in memory: that is what later stages will load.
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        report = verify(ckpt, reloaded, tok, show=True)
        summary = {
            "source": str(ckpt.path), "n_layer": a["n_layer"], "n_head": a["n_head"], "n_embd": a["n_embd"],
            "block_size": a["block_size"], "bias": a["bias"], "vocab_size": vocab, "vocab_size_checkpoint": a["vocab_size"],
            **{k: report[k] for k in ("max_abs_logit_diff", "positions_checked", "params_nanogpt", "params_hf",
                                      "params_cut_vocab", "params_zero_bias")},
            "atol": ATOL, "rtol": RTOL, "seconds": round(time.time() - started, 1),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (tmp / "README.md").write_text(_card(summary, out))
        (tmp / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    print(f"import-nanogpt done: {out}")
    return out


def _card(s: dict, out: Path) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in s.items())
    millions = s["params_hf"] / 1e6
    return (f"# nanoGPT checkpoint imported as GPT-2\n\n`{s['source']}` ({millions:.2f}M parameters) converted by "
            f"`posttrain import-nanogpt`. Load it with `AutoModelForCausalLM.from_pretrained('{out}')`.\n\n"
            f"Verified: logits equal nanoGPT's forward pass within atol={s['atol']}, rtol={s['rtol']} (max difference "
            f"{s['max_abs_logit_diff']:.3g} over {s['positions_checked']} positions), and parameter counts match "
            f"({s['params_nanogpt']:,} in the checkpoint, tied embeddings counted once, minus "
            f"{s['params_cut_vocab']:,} for padded vocabulary rows, plus {s['params_zero_bias']:,} zero biases, "
            f"= {s['params_hf']:,}).\n\n## Summary\n\n| key | value |\n|---|---|\n{rows}\n")
