"""Reading PyTorch pickles safely: torch.load(weights_only=True), which unpickles tensors and plain
values only, with every way it can fail on a user's file turned into one line that says which: the
pickle names code to run (refused, with the global it names), or the file is not a PyTorch pickle."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from posttrain.errors import UserError

GLOBAL_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def load_weights_only(path: Path, what: str, fix: str):
    """torch.load(path, weights_only=True), numpy's arrays and dtypes allowed as the Trainer allows them
    in its RNG states. `what` names the file's role in the message, `fix` says what to do."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        culprit = GLOBAL_REFUSED.search(text)
        named = culprit.group(1) if culprit else code_named(path)
        if named:
            raise UserError(f"{what}: {path} refused: loading it would run code ({named}); {fix}") from None
        reason = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip() or text
        raise UserError(f"{what}: {path} is not a PyTorch checkpoint ({reason.splitlines()[0] if reason else 'unreadable'}); "
                        f"{fix}") from None
    except Exception as e:  # torch.load fails in many ways on a file that is not a checkpoint
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what}: {path} is not a PyTorch checkpoint ({first}); {fix}") from None


# Modules whose globals a tensor checkpoint names in the ordinary way (torch's rebuild functions and
# storages, OrderedDict, numpy arrays in RNG states); any other is code the file asks to run.
_PLAIN = ("torch", "collections", "numpy", "_codecs", "builtins.set")


def code_named(path: Path) -> str | None:
    """The first global outside _PLAIN that the pickle in `path` names (a torch.save zip's data.pkl, or
    a bare pickle), read with pickletools without running anything; None for none, or for a file that
    is no pickle. torch's weights_only refusal does not always name it (a protocol-4 pickle is refused
    on its first unsupported opcode)."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = Path(path).read_bytes()
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            name = None
            if op.name in ("GLOBAL", "INST"):
                name = arg.replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            if name and not name.startswith(_PLAIN):
                return name
    except Exception:  # noqa: BLE001 - not a pickle (or a broken one): nothing it names
        return None
    return None


# The pickles a resume reads itself (the Trainer's, PPO's). training_args.bin is never loaded on resume;
# DeepSpeed's own files sit in global_step*/ and are read by DeepSpeed.
RESUMED = ("*.pt", "*.pth")


def check_checkpoint_pickles(ckpt: Path) -> None:
    """Every pickle a resume from `ckpt` will load, read with weights_only before anything else runs."""
    for pattern in RESUMED:
        for file in sorted(ckpt.glob(pattern)):
            load_weights_only(file, "resume", "pass --force to start over, or delete that checkpoint")
