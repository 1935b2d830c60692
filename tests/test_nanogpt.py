"""`posttrain import-nanogpt`: nanoGPT checkpoints become Hugging Face GPT-2 directories with the same logits.

The checkpoints are made by `NanoGPT` below, a module written after nanoGPT's model.py (same names,
nn.Linear layouts, tied lm_head, optional biases). It is independent of posttrain's own reference
forward pass, so these tests check the importer against a second implementation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import cli

# --- nanoGPT's model, in miniature ---------------------------------------------------------------


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig, mask_buffer: bool):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd = c.n_head, c.n_embd
        if mask_buffer:  # nanoGPT without flash attention keeps the causal mask as a buffer named "bias"
            self.register_buffer("bias", torch.tril(torch.ones(c.block_size, c.block_size)).view(1, 1, c.block_size, c.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # the explicit (non-flash) path
        att = att.masked_fill(torch.tril(torch.ones(T, T, dtype=torch.bool)).logical_not(), float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig, mask_buffer: bool):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c, mask_buffer)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, c: GPTConfig, mask_buffer: bool = False):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList([Block(c, mask_buffer) for _ in range(c.n_layer)]), ln_f=LayerNorm(c.n_embd, c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT
        for name, p in self.named_parameters():  # non-trivial values everywhere, biases and LayerNorms included
            nn.init.normal_(p, mean=1.0 if name.endswith("ln_1.weight") else 0.0, std=0.2)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def save_ckpt(path: Path, model: NanoGPT, compiled: bool = False, **extra) -> Path:
    """A checkpoint as nanoGPT's train.py writes it (optimizer state and config included)."""
    c = model.config
    state = model.state_dict()
    if compiled:  # torch.compile wraps the model; its state dict keys gain this prefix
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=c.bias,
                      vocab_size=c.vocab_size, dropout=c.dropout)
    torch.save({"model": state, "model_args": model_args, "optimizer": {"state": {}, "param_groups": []},
                "iter_num": 100, "best_val_loss": torch.tensor(3.2), "config": {"learning_rate": 6e-4}, **extra}, path)
    return path


def make(tmp_path: Path, name: str = "ckpt.pt", seed: int = 0, mask_buffer: bool = False, compiled: bool = False,
         **config) -> tuple[NanoGPT, Path]:
    torch.manual_seed(seed)
    model = NanoGPT(GPTConfig(**config), mask_buffer).eval()
    return model, save_ckpt(tmp_path / name, model, compiled)


def imported_logits(out: Path, idx: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


def assert_refused(proc, out: Path, *words: str) -> None:
    """Exit 2, one line on stderr that names the problem, no traceback, no finished output."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posttrain: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in lines[0], lines[0]
    assert not (out / "DONE").exists()


# --- importing -------------------------------------------------------------------------------------


def test_padded_vocab_import_matches_nanogpt_logits(tmp_path):
    model, ckpt = make(tmp_path)  # vocab 50304 -> 50257
    out = tmp_path / "mygpt"
    proc = cli("import-nanogpt", str(ckpt), str(out), check=True)
    assert "dropping 47 rows" in proc.stdout and "logits:" in proc.stdout and "ok" in proc.stdout
    assert (out / "DONE").exists() and (out / "README.md").exists()

    idx = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(idx)[..., :50257]
    got = imported_logits(out, idx)
    assert got.shape == (3, 32, 50257)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()

    s = json.loads((out / "summary.json").read_text())
    assert s["vocab_size"] == 50257 and s["vocab_size_checkpoint"] == 50304
    assert s["max_abs_logit_diff"] < 1e-4
    # tied embeddings counted once; 47 padded rows x 64 cut
    assert s["params_nanogpt"] == sum(p.numel() for p in model.parameters())
    assert s["params_cut_vocab"] == 47 * 64 and s["params_zero_bias"] == 0
    assert s["params_hf"] == s["params_nanogpt"] - 47 * 64


def test_imported_dir_generates_with_the_gpt2_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ckpt = make(tmp_path, vocab_size=50257)
    out = tmp_path / "gen"
    cli("import-nanogpt", str(ckpt), str(out), check=True)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok("Do you have time")["input_ids"] == [5211, 345, 423, 640]
    assert model.config.vocab_size == len(tok) == 50257 and model.config.eos_token_id == 50256
    ids = tok("Once upon a time", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, ids["input_ids"].shape[1] + 8)
    assert isinstance(tok.decode(gen[0]), str)


def test_torch_compile_prefix_and_mask_buffers(tmp_path):
    model, ckpt = make(tmp_path, compiled=True, mask_buffer=True, vocab_size=50257)
    assert any(".attn.bias" in k for k in model.state_dict())  # mask buffers that must be skipped
    out = tmp_path / "compiled"
    cli("import-nanogpt", str(ckpt), str(out), check=True)
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(imported_logits(out, idx), model(idx), atol=1e-4, rtol=1e-4)


def test_bias_false_gets_zero_biases(tmp_path):
    model, ckpt = make(tmp_path, bias=False)
    out = tmp_path / "nobias"
    proc = cli("import-nanogpt", str(ckpt), str(out), check=True)
    assert "bias=False" in proc.stdout
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(imported_logits(out, idx), model(idx)[..., :50257], atol=1e-4, rtol=1e-4)
    s = json.loads((out / "summary.json").read_text())
    assert s["params_zero_bias"] == (11 * 2 + 1) * 64  # 6 biases per block (11 x n_embd) and ln_f's
    assert s["params_hf"] == s["params_nanogpt"] - 47 * 64 + s["params_zero_bias"]


def test_load_nanogpt_returns_model_and_tokenizer(tmp_path):
    from posttrain.nanogpt import load_nanogpt

    model, ckpt = make(tmp_path, vocab_size=50257)
    hf, tok = load_nanogpt(ckpt)
    assert len(tok) == 50257 and tok.model_max_length == 32
    idx = torch.tensor([tok.encode("Do you have time")])
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=idx).logits, model(idx), atol=1e-4, rtol=1e-4)


def test_reference_forward_is_nanogpt(tmp_path):
    """posttrain's functional nanoGPT forward (used by the command's own check) equals this module."""
    from posttrain.nanogpt import forward, read_checkpoint

    model, ckpt = make(tmp_path, bias=False, mask_buffer=True)
    c = read_checkpoint(ckpt)
    idx = torch.randint(0, 50304, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(forward(c.state, c.args, idx), model(idx), atol=1e-5, rtol=1e-5)


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    _, ckpt = make(tmp_path, vocab_size=50257)
    out = tmp_path / "twice"
    cli("import-nanogpt", str(ckpt), str(out), check=True)
    proc = cli("import-nanogpt", str(ckpt), str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    cli("import-nanogpt", str(ckpt), str(out), "--force", check=True)
    assert (out / "DONE").exists()


def test_failed_verification_writes_no_done(tmp_path, monkeypatch):
    """If the imported model disagrees with nanoGPT's forward pass, the command stops before DONE."""
    import posttrain.nanogpt as nanogpt
    from posttrain.errors import UserError

    _, ckpt = make(tmp_path, vocab_size=50257)
    reference = nanogpt.forward
    monkeypatch.setattr(nanogpt, "forward", lambda *a: reference(*a) + 1e-3)  # a subtly different model
    out = tmp_path / "mismatch"
    with pytest.raises(UserError, match="logits differ"):
        nanogpt.import_nanogpt(ckpt, out)
    assert not (out / "DONE").exists() and not (out / "summary.json").exists()


# --- bad checkpoints: one line, exit 2, no DONE ------------------------------------------------


class Payload:
    """Any custom class: unpickling it would mean running code from the checkpoint's author."""


def test_pickled_object_is_refused(tmp_path):
    model, _ = make(tmp_path, vocab_size=50257)
    ckpt = save_ckpt(tmp_path / "evil.pt", model, extra=Payload())
    out = tmp_path / "evil"
    assert_refused(cli("import-nanogpt", str(ckpt), str(out)), out, "evil.pt", "weights_only=True", "Payload", "would run code")


def test_missing_and_extra_keys_are_named(tmp_path):
    model, _ = make(tmp_path, vocab_size=50257)
    state = model.state_dict()
    state.pop("transformer.h.1.mlp.c_fc.weight")
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(4)
    ckpt = tmp_path / "keys.pt"
    torch.save({"model": state, "model_args": dict(n_layer=2, n_head=2, n_embd=64, block_size=32, bias=True,
                                                   vocab_size=50257)}, ckpt)
    out = tmp_path / "keys"
    assert_refused(cli("import-nanogpt", str(ckpt), str(out)), out,
                   "missing transformer.h.1.mlp.c_fc.weight", "unexpected transformer.h.0.attn.rotary.weight")


def test_shapes_that_contradict_model_args(tmp_path):
    model, _ = make(tmp_path, vocab_size=50257)
    ckpt = tmp_path / "shapes.pt"
    torch.save({"model": model.state_dict(), "model_args": dict(n_layer=2, n_head=2, n_embd=64, block_size=64,
                                                                bias=True, vocab_size=50257)}, ckpt)
    out = tmp_path / "shapes"
    assert_refused(cli("import-nanogpt", str(ckpt), str(out)), out, "transformer.wpe.weight", "(32, 64)", "(64, 64)")


def test_vocab_smaller_than_the_tokenizer(tmp_path):
    _, ckpt = make(tmp_path, vocab_size=65)  # e.g. shakespeare_char
    out = tmp_path / "charlevel"
    assert_refused(cli("import-nanogpt", str(ckpt), str(out)), out, "65 token rows", "50257", "--tokenizer")
    assert not out.exists()


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    out = tmp_path / "junk"
    assert_refused(cli("import-nanogpt", str(junk), str(out)), out, "junk.pt", "not a PyTorch checkpoint")
    bare = tmp_path / "bare.pt"
    torch.save(NanoGPT(GPTConfig(vocab_size=50257)).state_dict(), bare)  # a state dict without model_args
    assert_refused(cli("import-nanogpt", str(bare), str(out)), out, "bare.pt", "model_args")


@pytest.mark.parametrize("args, word", [({"n_head": 3}, "divisible"), ({"n_layer": "2"}, "n_layer")])
def test_bad_model_args(tmp_path, args, word):
    model, _ = make(tmp_path, vocab_size=50257)
    ckpt = tmp_path / "args.pt"
    torch.save({"model": model.state_dict(), "model_args": {**dict(n_layer=2, n_head=2, n_embd=64, block_size=32,
                                                                    bias=True, vocab_size=50257), **args}}, ckpt)
    out = tmp_path / "args"
    assert_refused(cli("import-nanogpt", str(ckpt), str(out)), out, "model_args", word)
