"""Loading checkpoints and tokenizers, attaching chat templates, LoRA, and saving.

A model path may be a Hugging Face Hub id, a local HF directory, a run directory (which must have
DONE), a LoRA run directory (an adapter over its base model), or a nanoGPT `.pt` checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.inputs import read_json, read_model_config
from posttrain.runs import atomic_dir, check_output_dir, require_done
from posttrain.templates import COMMENT, SPECIAL, STOP, pad_id, read_template, stop_ids


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def from_pretrained(cls, path: str, what: str = "a model", **kw):
    """`cls.from_pretrained(path, **kw)` with every way a checkpoint can be broken as a one-line error
    that names the file: a local directory's config and weights are checked first (check_checkpoint),
    then what transformers itself refuses."""
    tokenizer = what == "a tokenizer"
    if Path(path).is_dir() and not tokenizer:
        check_checkpoint(Path(path), kw.get("trust_remote_code", False))
    try:
        return cls.from_pretrained(path, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e) or "auto_map" in str(e):
            raise _remote_code(path) from None
        raise UserError(f"model.path: cannot load {what} from {path} ({_first_line(e)})") from None
    except RuntimeError as e:
        if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
            raise UserError(f"model.path: {path}/config.json does not match its weights ({_first_line(e, 'size mismatch')}); "
                            "use the config.json saved with these weights") from None
        raise UserError(f"model.path: cannot load {what} from {path} ({_first_line(e)})") from None
    except (OSError, KeyError, TypeError, AttributeError, ImportError) as e:
        fix = ("the directory needs tokenizer files (tokenizer.json, or vocab.json + merges.txt)" if tokenizer
               else "is it a model directory or Hub name?")
        raise UserError(f"model.path: cannot load {what} from {path} ({_first_line(e)}); {fix}") from None
    except Exception as e:  # the tokenizers library raises plain Exceptions for a corrupt tokenizer.json
        if not tokenizer:
            raise
        raise UserError(f"model.path: cannot load {what} from {path} ({_first_line(e)}); restore its tokenizer files") from None


def _first_line(e: BaseException, containing: str = "") -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    line = next((x for x in lines if containing and containing in x), lines[0])
    return line if len(line) <= 160 else line[:157] + "..."


def _remote_code(path) -> UserError:
    return UserError(f"model.path: {path} needs code from its own repository to load (auto_map, trust_remote_code); "
                     "read that code, then set model.trust_remote_code: true if you trust it")


def check_checkpoint(path: Path, trust_remote_code: bool = False) -> None:
    """A local model directory, checked file by file before transformers reads it: config.json is a
    JSON object with a known model_type (or code the recipe trusts), and the weights are a readable
    safetensors file or a pickle that holds only tensors (torch.load(weights_only=True), never code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if is_adapter(path):
        return  # its base is checked when it loads
    cfg = read_model_config(path)
    if cfg is None:
        raise UserError(f"model.path: {path} is not a model directory (no config.json or adapter_config.json)")
    if "auto_map" in cfg and not trust_remote_code:
        raise _remote_code(path)
    kind = cfg.get("model_type")
    if not kind:
        raise UserError(f"model.path: {path}/config.json has no model_type; use the config.json saved with the weights")
    if kind not in CONFIG_MAPPING_NAMES and "auto_map" not in cfg:
        import transformers

        raise UserError(f"model.path: {path}/config.json: model_type {kind!r} is not an architecture transformers "
                        f"{transformers.__version__} knows; upgrade transformers, or fix model_type")
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors import safe_open

        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors raises its own error type for every kind of corruption
                raise UserError(f"model.path: {shard} is not a readable safetensors file ({_first_line(e)}); "
                                "re-save or re-download the weights") from None
        return
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if not pickles:
        raise UserError(f"model.path: {path} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
                        "copy the weights next to it")
    import pickle

    for file in pickles:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            from posttrain.pickles import GLOBAL_REFUSED, code_named

            culprit = GLOBAL_REFUSED.search(str(e))
            named = culprit.group(1) if culprit else code_named(file)
            if named:
                raise UserError(f"model.path: {file} refused: loading it would run code ({named}); convert it to "
                                "safetensors from a copy you trust") from None
            raise UserError(f"model.path: {file} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
        except Exception as e:
            raise UserError(f"model.path: {file} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"model.path: {file} is not a state dict of tensors; save the weights with save_pretrained")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    require_done(path, "model.path")
    if str(path).endswith(".pt"):
        from posttrain.nanogpt import load_nanogpt

        return load_nanogpt(path)[1]
    tok = from_pretrained(AutoTokenizer, path, "a tokenizer", trust_remote_code=trust_remote_code)
    if len(tok) <= 1:  # transformers builds an empty tokenizer for a directory that has none
        raise UserError(f"model.path: {path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); copy "
                        "the tokenizer saved with these weights next to them")
    return tok


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False, tokenizer=None,
                   finished: bool = True):
    """A causal LM from any supported path. A LoRA run loads as its base plus the adapter (a PeftModel).
    `finished=False` skips the DONE check (a stage reloading its own output before finishing)."""
    if finished:
        require_done(path, "model.path")
    if str(path).endswith(".pt"):
        from posttrain.nanogpt import load_nanogpt

        return load_nanogpt(path)[0]
    if is_adapter(path):
        from peft import PeftModel

        base_path = adapter_base(path)
        if is_adapter(base_path):  # a LoRA run on top of another LoRA run: that one merged first
            base = load_start_model(base_path, dtype, trust_remote_code, tokenizer)
        else:
            base = from_pretrained(AutoModelForCausalLM, base_path, dtype=torch_dtype(dtype),
                                   trust_remote_code=trust_remote_code)
        if tokenizer is not None and len(tokenizer) > base.get_input_embeddings().num_embeddings:
            # the adapter's run added chat tokens (grow only: many checkpoints pad their embeddings
            # beyond the tokenizer, and those rows stay)
            base.resize_token_embeddings(len(tokenizer))
        return PeftModel.from_pretrained(base, path)
    model = from_pretrained(AutoModelForCausalLM, path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    check_vocab(model, tokenizer, path)
    return model


def adapter_base(path: str | Path) -> str:
    """The base model a LoRA run's adapter was trained on; an error if that directory is gone."""
    config = read_json(Path(path) / "adapter_config.json")
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise UserError(f"{path}/adapter_config.json: no base_model_name_or_path; set it to the adapter's base model")
    # a Hub id is "org/name"; anything else (absolute, ./, or deeper paths such as runs/world/base) is a folder
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local and not Path(base).expanduser().exists():
        raise UserError(f"model.path: {path} is a LoRA adapter over {base}, which no longer exists; restore it, or "
                        f"set base_model_name_or_path in {path}/adapter_config.json to where it is now")
    return base


def load_start_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, tokenizer=None):
    """The model a stage starts from, as one plain causal LM: a LoRA run is loaded as its base with the
    adapter merged in, so a new adapter (or full fine-tuning) goes on top of the merged weights."""
    model = load_causal_lm(path, dtype, trust_remote_code, tokenizer=tokenizer)
    if is_adapter(path):
        model = model.merge_and_unload()
        # peft records this as the base of an adapter trained on top; the LoRA run, not its own base
        # (which lacks the merged adapter), is what that adapter must be loaded onto
        model.name_or_path = str(path)
    return model


def check_vocab(model, tokenizer, path) -> None:
    """A tokenizer with ids beyond the model's embedding rows would index past the table (or be silently
    resized into): refuse it."""
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"model.path: {path}'s tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                        f"{rows} rows; use the tokenizer saved with these weights")


def sequence_classifier(path: str, dtype: str, trust_remote_code: bool, tokenizer, **head):
    """An AutoModelForSequenceClassification (a new head, seeded by the caller) on the weights at `path`.
    A LoRA run is merged into its base first (into a temporary directory), so classify and reward
    start from a LoRA SFT run as they do from a full one."""
    import tempfile

    from transformers import AutoModelForSequenceClassification

    require_done(path, "model.path")
    kw = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **head)
    if not is_adapter(path):
        model = from_pretrained(AutoModelForSequenceClassification, path, **kw)
    else:
        with tempfile.TemporaryDirectory(prefix="posttrain-merged-") as tmp:
            load_start_model(path, "float32", trust_remote_code, tokenizer).save_pretrained(tmp)
            model = from_pretrained(AutoModelForSequenceClassification, tmp, **kw)
        model.name_or_path = str(path)
    if tokenizer is not None:
        check_vocab(model, tokenizer, path)
        # the HF head needs some pad id to run a batch; which one does not matter: posttrain reads the
        # head at the last real token from the attention mask (last_token_logits)
        model.config.pad_token_id = pad_id(tokenizer)
    return model


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def last_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence-classification model's head read at each row's last real token, located by the
    attention mask (right or left padding). The HF classes locate it by searching for the pad id,
    which goes wrong when pad == eos and a text ends with its end token (every chat answer): they
    would read the token before it. The forward runs through `model` itself (DDP and peft wrappers
    included, so gradients synchronise); a hook keeps the body's hidden states, and the head is
    applied to them exactly as the HF forward does (all positions, then one picked)."""
    net = _unwrap(model)
    body = getattr(net, net.base_model_prefix)
    kept = {}

    def keep(_module, _args, out):
        kept["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = body.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    logits = net.score(kept["h"])
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    return logits[torch.arange(len(input_ids), device=logits.device), last.to(logits.device)]


def context_length(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def check_max_length(model, max_length: int, key: str = "data.max_length") -> None:
    limit = context_length(model)
    if limit is not None and max_length > limit:
        raise UserError(f"{key}: {max_length} is longer than the model's context ({limit} positions); set it to at most {limit}")


# --- chat templates --------------------------------------------------------------------------------


def attach_chat_template(model, tokenizer, template_path: str) -> list[int]:
    """Give a model the chat template in `template_path`. Tokens the template uses that the tokenizer
    lacks become special tokens, and the embedding grows to hold them (new rows start at the mean of
    the old ones). The template's declared stop token becomes the tokenizer's EOS, and a pad token
    distinct from it is ensured, so padding never hides a trained end token. Returns the new token ids."""
    template = read_template(template_path)
    body = COMMENT.sub("", template)
    specials = sorted(set(SPECIAL.findall(body)) - set(tokenizer.get_vocab()))
    declared = STOP.search(template)
    stop = declared.group(1) if declared else "eos_token"
    added = []
    if specials:
        tokenizer.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=False)
        added = tokenizer.convert_tokens_to_ids(specials)
    if stop != "eos_token":
        if stop not in tokenizer.get_vocab():
            raise UserError(f"model.chat_template: {template_path} declares stop token {stop} but never uses it")
        tokenizer.eos_token = stop
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        added.append(tokenizer.pad_token_id)
    tokenizer.chat_template = template
    if model is not None:  # None: only the tokenizer is needed (show-mask)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            # mean_resizing draws the new rows around the mean from torch's global RNG: seed it, so
            # that the same recipe gives the same model (and every process of a launch the same rows)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def use_own_template(model, tokenizer) -> None:
    """Prepare a model that keeps the chat template its tokenizer ships with: nothing is added or
    resized; with no pad token the EOS pads (every length comes from attention masks), and
    generation stops at the template's end-of-turn token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# --- LoRA ------------------------------------------------------------------------------------------


def lora_config(cfg, task_type: str, new_token_ids: list[int] | None = None):
    """A peft LoraConfig from the recipe's `model.lora`. New token rows (chat tokens) are made
    trainable, since a frozen embedding could never learn what <|im_end|> means."""
    from peft import LoraConfig

    extra = {"trainable_token_indices": list(new_token_ids)} if new_token_ids else {}
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      task_type=task_type, **extra)


def expose_head_bias(model) -> None:
    """TRL's fused LM head reads `lm_head.bias`, but peft's wrapper for trainable token rows (LoRA with
    new chat tokens on a tied embedding, as in GPT-2) forwards only `weight` (the merged rows, so
    gradients reach the new tokens). Hand the wrapper the bias of the layer it wraps (None for GPT-2)."""
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "original_module") and "bias" not in head.__dict__:
        head.__dict__["bias"] = getattr(head.original_module, "bias", None)


def add_blocks(model, n: int) -> None:
    """Append `n` GPT-2 blocks on top of the existing ones, each starting as the identity (its two
    output projections are zero), so the model computes exactly what it did until training moves
    them. For a reward model: a block on top can read what the last pretrained block predicted at
    one position and compare it with the token that actually comes next, which a small model's own
    blocks are too few to do while they still compute the prediction."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    if n == 0:  # the default: any architecture
        return
    body = getattr(model, "transformer", None)
    if model.config.model_type != "gpt2" or body is None:
        raise UserError(f"reward.extra_layers: adding blocks is supported for GPT-2 models, not "
                        f"{model.config.model_type}; set it to 0")
    for _ in range(n):
        block = GPT2Block(model.config, layer_idx=len(body.h))
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
        body.h.append(block.to(next(model.parameters()).dtype))
    model.config.n_layer = len(body.h)


def merge_adapter(run_dir: str | Path, out_dir: str | Path | None = None, finished: bool = True) -> Path:
    """Merge a LoRA run's adapter into its base and save a full model (default: RUN_DIR/merged).
    `finished=False` is for the stage itself, merging before it writes DONE."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if finished:
        require_done(run_dir, "RUN_DIR")
    if not is_adapter(run_dir):
        raise UserError(f"{run_dir}: not a LoRA run (no adapter_config.json); only adapters need merging")
    out = check_output_dir(Path(out_dir) if out_dir else run_dir / "merged", "--out", _is_merged, "a merged model")
    tok = from_pretrained(AutoTokenizer, str(run_dir), "a tokenizer")
    model = load_causal_lm(str(run_dir), dtype="float32", tokenizer=tok, finished=finished).merge_and_unload()
    with atomic_dir(out) as tmp:  # what --out held is replaced only once the merged model is complete
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "DONE").write_text(f"merged from {run_dir}\n")
    return out


def _is_merged(path: Path) -> bool:
    done = path / "DONE"
    return done.is_file() and done.read_text().startswith("merged from")


def right_padded_batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    """Token sequences in batches of similar length (less padding), right-padded with `pad_id`.
    Yields (the batch's indices into `seqs`, input ids, attention mask)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids = torch.full((len(idx), max(len(seqs[i]) for i in idx)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        yield idx, ids, mask
