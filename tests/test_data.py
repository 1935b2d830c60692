"""Data loading: every format, with file:line errors for bad rows."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, write

from posttrain import data
from posttrain.errors import UserError


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: invalid JSON"):
        data.load(str(path))


def test_missing_field_names_row_line_and_format(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    table = data.load(str(path))
    assert data.infer_format(table, ("messages", "prompt_completion", "text")) == "prompt_completion"
    with pytest.raises(UserError, match=r"d.jsonl:2: row is missing 'completion'"):
        data.validate(table, "prompt_completion")


def test_messages_rules(tmp_path):
    def check(messages):
        path = write(tmp_path / "m.jsonl", __import__("json").dumps({"messages": messages}) + "\n")
        data.validate(data.load(str(path)), "messages")

    check([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(UserError, match="unknown role 'bot'"):
        check([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}])
    with pytest.raises(UserError, match="no assistant turn"):
        check([{"role": "user", "content": "hi"}])


def test_csv_tsv_json_parquet(tmp_path):
    write(tmp_path / "a.csv", 'text,label\n"hello, world",1\nbye,0\n')
    assert data.load(str(tmp_path / "a.csv")).rows[0] == {"text": "hello, world", "label": "1"}
    write(tmp_path / "a.tsv", 'ham\tsay "hi\nspam\twin\n')
    rows = data.load(str(tmp_path / "a.tsv"), columns=["label", "text"]).rows
    assert rows == [{"label": "ham", "text": 'say "hi'}, {"label": "spam", "text": "win"}]
    write(tmp_path / "a.json", '[{"text": "x"}]')
    assert data.load(str(tmp_path / "a.json")).rows == [{"text": "x"}]
    import pandas as pd

    pd.DataFrame({"text": ["p"]}).to_parquet(tmp_path / "a.parquet")
    assert data.load(str(tmp_path / "a.parquet")).rows == [{"text": "p"}]
    with pytest.raises(UserError, match=r"a.csv:3: 1 fields, expected 2"):
        write(tmp_path / "a.csv", "text,label\nok,1\nbroken\n")
        data.load(str(tmp_path / "a.csv"))


@pytest.mark.skipif(not (SHARED_DATA / "sms_spam_collection").exists(), reason="shared data folder absent")
def test_sms_spam_keeps_every_row():
    table = data.load(str(SHARED_DATA / "sms_spam_collection" / "SMSSpamCollection"), columns=["label", "text"])
    labels = [r["label"] for r in table]
    assert len(table) == 5574 and labels.count("ham") == 4827 and labels.count("spam") == 747
