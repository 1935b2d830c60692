"""Load datasets from local files or the Hub and check every row against its format.

Local files: JSONL, JSON (a list of objects), CSV, TSV and Parquet; a file with no extension is read
as TSV. TSV is read without quote
handling, because a `"` inside a tab-separated text field is text, not quoting (the SMS Spam
Collection loses two rows to that mistake otherwise). A Hub dataset is `owner/name` or
`owner/name:split` and needs network access.

Formats (DESIGN.md), by the fields a row must have:
- text: `text`                      - classification: `text`, `label` (names configurable)
- messages: `messages` [{role, content}]  - prompt_completion: `prompt`, `completion`
- preference: `prompt`, `chosen`, `rejected` (strings or message lists)
- prompts: `prompt` (+ gold fields for a verifier)
- alpaca: `instruction`, `output` (+ optional `input`), read as a one-turn chat
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import UserError
from posttrain.inputs import is_hub_id

FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "classification": ("text", "label"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
}
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass
class Table:
    """Rows of a dataset, each remembering where it came from (file:line) for error messages."""

    source: str
    rows: list[dict]
    lines: list[int] = field(default_factory=list)  # 1-based line (or record) number of each row

    def where(self, i: int) -> str:
        return f"{self.source}:{self.lines[i]}" if self.lines else f"{self.source}[{i}]"

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def head(self, n: int | None) -> Table:
        return self if n is None else Table(self.source, self.rows[:n], self.lines[:n])

    def select(self, keep: list[int]) -> Table:
        return Table(self.source, [self.rows[i] for i in keep], [self.lines[i] for i in keep] if self.lines else [])


def load(source: str, columns: list[str] | None = None, limit: int | None = None) -> Table:
    """Read a local file or a Hub dataset into a Table. Raises UserError naming file and line."""
    path = Path(source)
    if path.is_file():
        table = _read_file(path, columns)
    elif path.exists():
        raise UserError(f"{source}: is a directory; give a data file ({', '.join(SUFFIXES)})")
    elif is_hub_id(source.partition(":")[0]):
        table = _read_hub(source)
    else:
        raise UserError(f"{source}: file not found (run `make world` first if it is world data)")
    if not table.rows:
        raise UserError(f"{source}: the dataset is empty")
    return table.head(limit)


def _text(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to be a data row") from None


def _read_file(path: Path, columns: list[str] | None) -> Table:
    suffix = path.suffix.lower()
    src = str(path)
    if suffix == ".jsonl":
        rows, lines = [], []
        for n, line in enumerate(io.StringIO(_text(path), newline=None), 1):  # newlines as open() reads them
            if not line.strip():
                continue
            row = _json(line, f"{src}:{n}")
            if not isinstance(row, dict):
                raise UserError(f"{src}:{n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
            lines.append(n)
        return Table(src, rows, lines)
    if suffix == ".json":
        text = _text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{src}:{e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{src}: JSON nested too deeply to be a dataset") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{src}: a .json dataset must be a list of objects (or {{\"data\": [...]}})")
        return Table(src, data, [])
    if suffix in (".csv", ".tsv", ""):
        return _read_delimited(path, columns)
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow's errors for a file that is not Parquet have no common base
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{src}: not a readable Parquet file ({first[:120]})") from None
        return Table(src, frame.to_dict(orient="records"), [])
    raise UserError(f"{src}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _read_delimited(path: Path, columns: list[str] | None) -> Table:
    tsv = path.suffix.lower() == ".tsv" or path.suffix == ""
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_text(path), newline=""), delimiter="\t" if tsv else ",", quoting=quoting)
    try:
        header = columns or next(reader, None)
        if not header:
            raise UserError(f"{path}: empty file")
        rows, lines = [], []
        for record in reader:
            if not record or record == [""]:
                continue
            if len(record) != len(header):
                raise UserError(
                    f"{path}:{reader.line_num}: {len(record)} fields, expected {len(header)} ({', '.join(header)})"
                )
            rows.append(dict(zip(header, record, strict=True)))
            lines.append(reader.line_num)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: unreadable {'TSV' if tsv else 'CSV'} ({e})") from None
    return Table(str(path), rows, lines)


def _read_hub(source: str) -> Table:
    """owner/name, owner/name:split, or owner/name:config:split (openai/gsm8k:main:test)."""
    name, _, split = source.partition(":")
    config, _, split = split.rpartition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # network, auth, unknown name: all user-fixable
        raise UserError(f"{source}: could not load this Hub dataset ({type(e).__name__}: {e}); check the name, split and network") from None
    return Table(source, ds.to_list(), [])


# --- formats -----------------------------------------------------------------------------------------


def heldout_size(n: int, limit: int | None, fraction: float, train_fraction: float) -> int:
    """How many of `n` held-out records to evaluate on. With data.limit (a quick try) the held-out set
    shrinks in proportion to the training rows actually used (limit / train_fraction records in all),
    taking the first of the same held-out records, so it still never overlaps another run's training."""
    if limit is None:
        return n
    return max(1, min(n, round(limit * fraction / max(train_fraction, 1e-9))))


def infer_format(table: Table, allowed: tuple[str, ...]) -> str:
    """The first format in `allowed` whose fields the first row has."""
    first = table.rows[0]
    for fmt in allowed:
        if all(k in first for k in FIELDS[fmt]):
            return fmt
    wanted = " | ".join("+".join(FIELDS[f]) for f in allowed)
    raise UserError(f"{table.where(0)}: cannot tell the data format from fields {sorted(first)}; rows need {wanted}")


def validate(table: Table, fmt: str, names: dict[str, str] | None = None) -> None:
    """Check every row of `table` has the fields of `fmt` with the right types.
    `names` maps a format field to the column that holds it (e.g. {"label": "category"})."""
    names = names or {}
    needed = [names.get(f, f) for f in FIELDS[fmt]]
    for i, row in enumerate(table.rows):
        missing = [f for f in needed if f not in row or row[f] is None]
        if missing:
            raise UserError(
                f"{table.where(i)}: row is missing {', '.join(repr(m) for m in missing)} "
                f"(format {fmt} needs {', '.join(needed)})"
            )
        if fmt == "messages":
            check_messages(row["messages"], table.where(i), need_assistant=True)
        elif fmt == "preference":
            for key in ("prompt", "chosen", "rejected"):
                _check_text_or_messages(row[key], f"{table.where(i)}: {key}")
        else:
            for f in needed:
                if fmt == "classification" and f == names.get("label", "label"):
                    continue  # labels may be ints or strings
                if fmt in ("prompts", "prompt_completion") and isinstance(row[f], list):
                    check_messages(row[f], f"{table.where(i)}: {f}", need_assistant=False)
                elif not isinstance(row[f], str):
                    raise UserError(f"{table.where(i)}: field {f!r} must be a string, got {type(row[f]).__name__}")


def check_messages(messages: object, where: str, need_assistant: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {j} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {j} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {j} content must be a string")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: chat has no assistant turn, so there is nothing to train on; add one or drop the row")


def _check_text_or_messages(value: object, where: str) -> None:
    if isinstance(value, str):
        return
    check_messages(value, where, need_assistant=False)


def alpaca_to_messages(row: dict) -> list[dict]:
    """An Alpaca record as a user/assistant chat; a non-empty `input` becomes an "### Input:" section,
    as in the original Alpaca prompt."""
    user = row["instruction"]
    if row.get("input"):
        user += "\n\n### Input:\n" + row["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
