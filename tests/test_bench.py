"""`make bench` at smoke size: every contender runs for real (a few steps each) on the small world, and
the report holds a ratio and a reproducing command for every measure. Speed itself is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


def _bench(tmp_path, small_world, tiny_base, tiny_sft, tiny_reward, only: str, venv=None):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "posttrain.bench", "--size", "smoke", "--only", only, "--out", str(out),
           f"--data={small_world}", f"--base={tiny_base}", f"--sft={tiny_sft}", f"--reward={tiny_reward}",
           f"--trl-venv={venv or tmp_path / 'venv'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), proc.stdout


def test_smoke_bench_measures_every_training_and_generation_contender(tmp_path, small_world, tiny_base, tiny_sft,
                                                                      tiny_reward):
    report, md, stdout = _bench(tmp_path, small_world, tiny_base, tiny_sft, tiny_reward, "sft,reward,dpo,generate")
    rows = {(r["section"], r["what"]): r for r in report["rows"]}
    assert {s for s, _ in rows} == {"sft", "reward", "dpo", "generate"}
    timed = [r for r in rows.values() if r["unit"] != "fraction"]
    assert len(timed) == 7  # sft, reward and dpo: vs bare and vs TRL; generate: vs bare
    for r in timed:
        assert r["ours"] > 0 and r["theirs"] > 0 and r["ratio"] > 0, r
        assert "python -m posttrain.bench one" in r["command"], r
        for runs in r["runs"].values():
            assert len(runs) == report["info"]["rounds"]
    sft = rows[("sft", "training tokens/s vs bare")]
    assert sft["goal"] and sft["met"] in (True, False)
    # the bare loop and posttrain trained on the same number of real tokens (same packed batches)
    assert sft["runs"]["sft-posttrain"][0]["tokens"] == sft["runs"]["sft-bare"][0]["tokens"]
    fractions = rows[("sft", "padding fraction / trained-token fraction")]
    assert 0 <= fractions["ours"] < 1 and 0 < fractions["theirs"] <= 1
    assert md.startswith("# posttrain bench") and "| sft | training tokens/s vs bare |" in md
    assert "| generate | evaluation answers/s vs bare batched generate |" in stdout


def test_bench_refuses_an_unfinished_world_in_one_line(tmp_path, small_world):
    proc = subprocess.run([sys.executable, "-m", "posttrain.bench", "--size", "smoke", f"--sft={tmp_path}",
                           f"--data={small_world}", "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "make pipeline" in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_smoke_bench_ppo_against_trl_1_12_in_its_own_venv(tmp_path, small_world, tiny_base, tiny_sft, tiny_reward):
    """Creates a virtual environment with TRL 1.12 (pip, ~1 minute) and runs its PPOTrainer beside ours."""
    report, md, _ = _bench(tmp_path, small_world, tiny_base, tiny_sft, tiny_reward, "ppo")
    rows = {r["what"]: r for r in report["rows"]}
    ppo = rows["seconds per iteration vs TRL 1.12.0 PPOTrainer"]
    assert ppo["ours"] > 0 and ppo["theirs"] > 0 and "gold after 2 iterations" in ppo["note"]
    gold = rows["gold after 2 iterations, mean over seeds vs TRL"]
    assert 0 <= gold["ours"] <= 1 and 0 <= gold["theirs"] <= 1 and gold["met"] in (True, False)
    assert rows["rollout generation tokens/s vs bare model.generate"]["ratio"] > 0
    assert (tmp_path / "venv" / ".installed").exists()
    trl = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import trl; print(trl.__version__)"],
                         capture_output=True, text=True)
    assert trl.stdout.strip() == "1.12.0"
