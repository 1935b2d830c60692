"""Tiny randomly initialised checkpoints of eight model families, built from configs (no download), each
with a byte-level BPE tokenizer trained here and a chat template in that family's real format.
Gemma 3 and Qwen 3 are built as their base models come: tied input and output embeddings, sliding-window
attention layers, and their real vocabulary sizes (262,144 and 151,936 rows, far more than the
tokenizer's 600 tokens: the embeddings and logits are as large as the real models').

The templates are written the way the families ship them: no {% generation %} markers, their own
turn tokens, pad == eos or no pad at all. `EXPECTED` holds, for one conversation, the exact text of
every span assistant-only SFT must train, written by hand from each family's format.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "data_templates"  # the families' formats, as shipped
CHATML = (TEMPLATES / "qwen.jinja").read_text()

LLAMA3 = """{{- bos_token }}{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

# Mistral's [INST] format has no system turn: a system message is prepended to the first user turn.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}
{{- bos_token }}{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}
{%- else %}{{- raise_exception('Conversation roles must be user or assistant') }}{%- endif %}{%- endfor %}"""

GEMMA = (TEMPLATES / "gemma.jinja").read_text()

# Tulu-style turns, as used by chat fine-tunes of Pythia / GPT-NeoX: the answer ends with <|endoftext|>.
NEOX = """{%- for message in messages %}
{%- if message['role'] == 'assistant' %}{{- '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}
{%- else %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{%- endif %}
{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"""

# name: (config class, extra config, special tokens, tokenizer roles, chat template or None)
FAMILIES = {
    "gpt2": (GPT2Config, {}, ["<|endoftext|>"],
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, None),
    "llama": (LlamaConfig, {}, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, LLAMA3),
    "qwen2": (Qwen2Config, {}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, CHATML),
    "mistral": (MistralConfig, {}, ["<unk>", "<s>", "</s>"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, MISTRAL),
    "gemma": (GemmaConfig, {"head_dim": 16}, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, GEMMA),
    "gpt_neox": (GPTNeoXConfig, {}, ["<|endoftext|>", "<|padding|>", "<|user|>", "<|assistant|>", "<|system|>"],
                 {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}, NEOX),
    "gemma3": (Gemma3TextConfig, {"head_dim": 16, "vocab_size": 262_144, "tie_word_embeddings": True, "sliding_window": 16,
                                  "layer_types": ["sliding_attention", "full_attention"]},
               ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
               {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, GEMMA),
    "qwen3": (Qwen3Config, {"head_dim": 16, "vocab_size": 151_936, "tie_word_embeddings": True, "use_sliding_window": True,
                            "sliding_window": 16, "max_window_layers": 1},
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
              CHATML),
}

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Ada Lang live?"},
    {"role": "assistant", "content": "Ada Lang lives in Paris."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
]

# What assistant-only loss trains for CONVERSATION, span by span, per family's format (gpt2 has no
# template of its own and gets data_templates/chatml.jinja, which has markers).
EXPECTED = {
    "gpt2": ["Ada Lang lives in Paris.<|im_end|>", "3 plus 4 is 7.<|im_end|>"],
    "llama": ["Ada Lang lives in Paris.<|eot_id|>", "3 plus 4 is 7.<|eot_id|>"],
    "qwen2": ["Ada Lang lives in Paris.<|im_end|>", "3 plus 4 is 7.<|im_end|>"],
    "mistral": [" Ada Lang lives in Paris.</s>", " 3 plus 4 is 7.</s>"],
    "gemma": ["Ada Lang lives in Paris.<end_of_turn>", "3 plus 4 is 7.<end_of_turn>"],
    "gpt_neox": ["Ada Lang lives in Paris.<|endoftext|>", "3 plus 4 is 7.<|endoftext|>"],
    "gemma3": ["Ada Lang lives in Paris.<end_of_turn>", "3 plus 4 is 7.<end_of_turn>"],
    "qwen3": ["Ada Lang lives in Paris.<|im_end|>", "3 plus 4 is 7.<|im_end|>"],
}
END_OF_TURN = {"gpt2": "<|im_end|>", "llama": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>",
               "gemma": "<end_of_turn>", "gpt_neox": "<|endoftext|>", "gemma3": "<end_of_turn>", "qwen3": "<|im_end|>"}


def build_tokenizer(family: str, corpus: list[str]) -> PreTrainedTokenizerFast:
    _, _, specials, roles, template = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)
    if template is not None:
        tok.chat_template = template
    return tok


def build_checkpoint(family: str, out: Path, corpus: list[str]) -> Path:
    """A tiny checkpoint of `family` saved with save_pretrained (safetensors) beside its tokenizer."""
    from transformers import AutoModelForCausalLM

    cls, extra, *_ = FAMILIES[family]
    tok = build_tokenizer(family, corpus)
    size = dict(n_layer=2, n_embd=32, n_head=2, n_positions=256) if family == "gpt2" else dict(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256)
    if family == "gpt_neox":
        size.pop("num_key_value_heads")
    config = cls(**{"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                    "pad_token_id": tok.pad_token_id, **size, **extra})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
