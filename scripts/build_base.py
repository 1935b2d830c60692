"""A randomly initialised checkpoint of a real base-model family, built offline and saved with
save_pretrained (safetensors), for `posttrain pretrain` (model.path) to teach the world's corpus: the
"base model of another family" of docs/real-checkpoints.md, where gold can measure each stage.

    .venv/bin/python scripts/build_base.py --family gemma3 --corpus runs/world/data/pretrain.jsonl --out runs/gemma3/init

What the family keeps from its real base checkpoints (google/gemma-3-270m, Qwen/Qwen3-0.6B-Base): the
architecture class, tied input and output embeddings, sliding-window attention layers beside full ones,
its special tokens and roles (Gemma: <bos> inside the chat template, a `model` role, <end_of_turn> to
stop, pad != eos; Qwen 3: ChatML, <|im_end|> to stop, pad == eos = <|endoftext|>) and its chat template
as shipped (no {% generation %} markers). What it does not keep: the size (world-sized, so each stage
runs in minutes on a CPU) and the vocabulary (a byte-level BPE trained on the corpus; the real 262,144-
and 151,936-row vocabularies are tested in tests/test_families.py and timed in scripts/bench_lm_head_vocab.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast, Qwen3Config

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {
    "gemma3": {"specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
               "roles": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
               "template": "gemma.jinja"},
    "qwen3": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "roles": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
              "template": "qwen.jinja"},
}


def fail(message: str) -> None:
    print(f"build_base: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_corpus(path: Path) -> list[str]:
    """The `text` of every JSON line of `path`; one line naming the file and line when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--corpus {path}: cannot be read as UTF-8 text ({type(e).__name__}); run `make world` or name a JSON-lines file")
    texts = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
                texts.append(row["text"] if isinstance(row["text"], str) else None)
            except (json.JSONDecodeError, TypeError, KeyError):
                texts.append(None)
            if texts[-1] is None:
                fail(f"--corpus {path}:{n}: expected a JSON object with a string `text`")
    if not texts:
        fail(f"--corpus {path}: no text rows")
    return texts


def tokenizer(family: str, texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    spec = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=spec["specials"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **spec["roles"])
    tok.chat_template = (ROOT / "data_templates" / spec["template"]).read_text()
    return tok


def config(family: str, tok, layers: int, width: int, heads: int, context: int, window: int):
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True, "max_position_embeddings": context}
    size = {"num_hidden_layers": layers, "hidden_size": width, "intermediate_size": 4 * width,
            "num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": width // heads}
    if family == "gemma3":  # Gemma 3: five sliding-window layers to one global one; here the last is global
        types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        return Gemma3TextConfig(**ids, **size, sliding_window=window, layer_types=types,
                                query_pre_attn_scalar=width // heads)
    return Qwen3Config(**ids, **size, use_sliding_window=True, sliding_window=window, max_window_layers=layers - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=list(FAMILIES), default="gemma3")
    p.add_argument("--corpus", default="runs/world/data/pretrain.jsonl", help="JSON lines with a `text` field")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--window", type=int, default=32, help="sliding-window width (tokens)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose another --out")
    texts = read_corpus(Path(a.corpus))
    import torch

    tok = tokenizer(a.family, texts, a.vocab)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config(a.family, tok, a.layers, a.width, a.heads, a.context, a.window))
    model.generation_config.eos_token_id = tok.eos_token_id  # a base model stops on its EOS; SFT adds end-of-turn
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(t.numel() for t in model.parameters())
    print(f"{a.family}: {n / 1e6:.2f}M parameters, vocabulary {len(tok)}, {type(model).__name__} -> {out}")


if __name__ == "__main__":
    main()
