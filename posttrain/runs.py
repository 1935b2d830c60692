"""The run directory every stage writes, and its life cycle.

    runs/<name>/<stage>/
      recipe.yaml      the resolved recipe            metrics.jsonl   one line per logged step
      summary.json     final metrics, flat keys       README.md       model card
      tensorboard/     TensorBoard event files        plots/*.png     curves and charts
      checkpoints/     for resume (last K kept)       DONE            written last

A directory without DONE is incomplete: later stages refuse it, and running the same recipe again
resumes it from its last checkpoint. While a run writes, it holds an exclusive lock on `.lock`, so a
second run into the same directory is refused instead of corrupting the first. Only the main process
(rank 0) writes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import yaml

from posttrain.errors import UserError
from posttrain.recipe import Recipe


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see either the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(built: Path, final: Path) -> None:
    """Rename a completely written directory into place. What `final` held is replaced only at that
    moment (moved aside, then deleted), so a reader or a killed job sees the old directory or the new."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        Path(built).rename(final)
        shutil.rmtree(old)
    else:
        Path(built).rename(final)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write everything into `tmp`, a fresh sibling of `out`; it becomes
    `out` when the block ends (publish), and is deleted if the block fails, leaving `out` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _same_recipe(saved: str, recipe: Recipe) -> bool:
    """The same settings, whatever the order of the keys, and whatever settings a newer posttrain added
    since (the saved recipe is read with today's schema, so a new key counts at its default)."""
    if saved == recipe_yaml(recipe):
        return True
    try:
        old = type(recipe).model_validate(yaml.safe_load(saved))
    except (ValueError, yaml.YAMLError):  # a key or value today's schema refuses: not the same recipe
        return False
    return old.model_dump(mode="json") == recipe.model_dump(mode="json")


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step ([] before the first)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class AlreadyDone(Exception):
    """The output directory already holds a finished run of this exact recipe."""


def finished_with(recipe: Recipe) -> bool:
    """Whether recipe.output_dir holds a finished run of this exact recipe: the stage has nothing to
    do. Cheap (two small files), so the CLI asks before importing a stage or loading any model."""
    out = Path(recipe.output_dir)
    saved = out / "recipe.yaml"
    return (out / "DONE").exists() and saved.exists() and _same_recipe(saved.read_text(), recipe)


class Curve(NamedTuple):
    """One plot of logged metrics (plots.curves): these keys of metrics.jsonl against the step."""

    keys: Sequence[str]
    file: str  # under plots/
    title: str
    ylabel: str = ""


# Beside every checkpoint: what the checkpoint format lacks, and the number of processes that wrote it.
EXTRA_STATE_FILE = "posttrain_state.json"


def check_resume(recipe: Recipe, force: bool = False) -> None:
    """Refuse, before any model loads, to resume a checkpoint that another number of processes wrote
    (`WORLD_SIZE`, as the launcher sets it): its data order and per-process random states would not
    line up; or one whose pickles name code (posttrain/pickles.py). The stage itself resumes from that checkpoint only when the recipe is unchanged."""
    run = Run(recipe)
    saved = run.dir / "recipe.yaml"
    if force or (run.dir / "DONE").exists() or not saved.is_file() or not _same_recipe(saved.read_text(), recipe):
        return
    ckpt = run.last_checkpoint()
    if ckpt is None:
        return
    from posttrain.pickles import check_checkpoint_pickles

    check_checkpoint_pickles(ckpt)  # a pickle that names code is refused here, before the stage loads it
    check_processes(ckpt, int(os.environ.get("WORLD_SIZE", "1")))


def check_processes(ckpt: Path, now: int) -> None:
    """Refuse to resume `ckpt` with `now` processes when another number wrote it: the data order and
    the per-process random states would not line up."""
    state = ckpt / EXTRA_STATE_FILE
    if not state.is_file():
        return
    written = json.loads(state.read_text()).get("processes", 1)
    if written != now:
        raise UserError(f"{ckpt} was written by {written} process(es) and this run has {now}; resume it launched the "
                        "same way, or pass --force to start over")


class Run:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dir = Path(recipe.output_dir)
        self.is_main = is_main_process()
        self._lock_file = None
        self._tb = None
        self.fresh = False
        self.started = time.time()
        self.facts: dict = {}  # measured along the way by shared code (e.g. training state bytes); finish() adds them

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, force: bool = False) -> Run:
        """Claim the directory: skip if already done, resume if unfinished, else start fresh.

        Every process makes the same decision from what it reads here (rank 0 is the only one that
        changes the directory, and only in ways that cannot change the others' decision), so all of
        them skip, resume from the same checkpoint or start fresh together, without a barrier."""
        text = recipe_yaml(self.recipe)
        saved = self.dir / "recipe.yaml"
        if (self.dir / "DONE").exists() and not force:
            if finished_with(self.recipe):
                raise AlreadyDone(str(self.dir))
            raise UserError(
                f"{self.dir} holds a finished run of a different recipe; pass --force to replace it or set another output_dir"
            )
        different = saved.exists() and not _same_recipe(saved.read_text(), self.recipe)
        if different and not force:
            raise UserError(
                f"{self.dir} holds an unfinished run of a different recipe; pass --force to start over or set another output_dir"
            )
        self.fresh = force or different  # start over: no checkpoint of this directory is resumed
        if self.is_main:
            check_output_dir(self.dir, "output_dir")
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"output_dir: cannot create {self.dir} ({e.strerror}); choose another path") from None
            self._lock()
            if self.fresh:
                self._clear()
            write_atomic(saved, text)
        return self

    def _lock(self) -> None:
        f = open(self.dir / ".lock", "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{self.dir} is in use by a running job ({holder}); wait for it or set another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock_file = f

    def _clear(self) -> None:
        for child in self.dir.iterdir():
            if child.name == ".lock":
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (checkpoints are renamed into place only once written)."""
        if self.fresh or not self.checkpoints.is_dir():
            return None
        done = [p for p in self.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)

    def rewind(self) -> Path | None:
        """Go back to the last complete checkpoint, if any: metrics.jsonl is cut back to its step and the
        checkpoint returned, to resume from (None: start at step 0)."""
        ckpt = self.last_checkpoint()
        if ckpt is not None and self.is_main:
            step = int(ckpt.name.split("-")[-1])
            self.truncate_metrics(step)
            print(f"resuming {self.dir} from {ckpt.name}")
        return ckpt

    def truncate_metrics(self, step: int) -> None:
        path = self.dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
            write_atomic(path, "".join(line + "\n" for line in keep))

    # -- outputs ---------------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict) -> None:
        """One metrics line (metrics.jsonl) and the same scalars in TensorBoard."""
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.recipe.logging.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def metrics(self) -> list[dict]:
        return read_metrics(self.dir)

    def plots_dir(self) -> Path:
        p = self.dir / "plots"
        p.mkdir(exist_ok=True)
        return p

    def finish(self, summary: dict, *, title: str, notes: str, save: Callable[[str], object] | None = None,
               tokenizer=None, curves: Sequence[Curve] = ()) -> Path:
        """The end of every stage, in one order: the model written by `save(dir)` (and the tokenizer),
        the curves drawn from metrics.jsonl, the summary printed, summary.json and the model card
        (README.md) written, and DONE, last. A stage calls it on the main process only."""
        if save is not None:
            save(str(self.dir))
            check_finite_weights(self.dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.dir))
        if curves:
            from posttrain.plots import curves as draw

            rows = self.metrics()
            for c in curves:
                draw(rows, list(c.keys), self.plots_dir() / c.file, c.title, c.ylabel)
        summary = {k: _plain(v) for k, v in {**self.facts, **summary}.items()}
        summary.setdefault("seconds", round(time.time() - self.started, 1))
        print_summary(f"{self.recipe.stage} summary", summary)
        write_atomic(self.dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        write_atomic(self.dir / "README.md", model_card(title, self.recipe, summary, notes))
        if self._tb is not None:
            self._tb.close()
        write_atomic(self.dir / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        self.release()
        return self.dir

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def check_finite_weights(folder: Path) -> None:
    """Every tensor a stage saved (the model, a merged model, an adapter) holds finite numbers: DONE is
    never written over NaN or inf weights."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*/*.safetensors")):
        if "checkpoints" in file.parts:
            continue
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                t = f.get_tensor(name)
                if t.is_floating_point() and not t.isfinite().all():
                    raise UserError(f"{file}: {name} holds NaN or inf after training, so DONE is not written; the run "
                                    "diverged: lower train.lr, then run it again with --force")


def _plain(v):
    """JSON-friendly scalars (tensors and numpy numbers become floats)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def require_done(path: str | Path, key: str) -> Path:
    """A run directory that a stage reads from must be finished. Ours are marked by recipe.yaml (a stage)
    or summary.json (import-nanogpt), and DONE is written last, only once everything was verified."""
    p = Path(path)
    ours = (p / "recipe.yaml").exists() or (p / "summary.json").exists()
    if p.is_dir() and ours and not (p / "DONE").exists():
        raise UserError(f"{key}: {p} is an unfinished run (no DONE file); finish or rerun that stage first")
    return p


def is_run_dir(p: Path) -> bool:
    """A stage's run directory: recipe.yaml is written right after the lock, before anything else."""
    return (p / "recipe.yaml").exists() or (p / ".lock").exists()


def check_output_dir(path: str | Path, key: str, replaceable=is_run_dir, what: str = "a posttrain run") -> Path:
    """An output directory posttrain may write (and later replace): not a file, not under a file,
    writable, and either absent, empty, or one that `replaceable` recognises as this writer's own
    output (a stage's run, a compare report, a merged model). Anything else is refused: never written
    into, never deleted."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}: {p} is a file, not a directory; choose another path")
    parent = next((a for a in [p, *p.parents] if a.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{key}: {p} is under {parent}, which is a file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key}: cannot write under {parent} (permission denied); choose another path")
    if p.is_dir() and any(p.iterdir()) and not replaceable(p):
        names = sorted(c.name for c in p.iterdir())
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise UserError(f"{key}: {p} exists and is not {what} ({shown}); it is never written into or deleted: "
                        "choose another path")
    return p


def print_summary(title: str, summary: dict) -> None:
    """The end-of-stage summary as a two-column table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        shown = f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
        table.add_row(k, shown)
    Console().print(table)


def model_card(title: str, recipe: Recipe, summary: dict, notes: str = "") -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    return (
        f"# {title}\n\n{notes}\n\n## Final metrics\n\n| key | value |\n|---|---|\n{rows}\n\n"
        f"## Recipe\n\n```yaml\n{recipe_yaml(recipe)}```\n"
    )
