"""The command line: one-line errors with exit status 2, stage skipping, config recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_OVERRIDES
from test_security import FAKE_TOKEN, assert_no_token


def cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env=env,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--preset", "nope"], "error: unknown preset 'nope'"),
        (["run", "train.lr=1"], "error: unknown config key 'train.lr'"),
        (["merge", "--run-dir", "{tmp}/empty"], "adapter_config.json is missing; run `qlora-pipeline train"),
        (["prepare", "--run-dir", "{tmp}/r", "--data-files", "{tmp}/missing.jsonl"], "does not exist"),
        (["train", "--run-dir", "{tmp}/r2", "--resume"], "is missing; run `qlora-pipeline prepare"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("prepare", "--run-dir", str(tmp_path / "file"))
    assert result.returncode == 2 and "is a file" in result.stderr


def test_run_records_config_and_skips_done_stages(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = cli("run", "--preset", "tiny", "--run-dir", str(run), *TEST_OVERRIDES)
    assert result.returncode == 0, result.stderr[-2000:]
    for stage in ("prepare", "train", "merge", "evaluate"):
        assert f"[{stage}] already done with this configuration; skipping" in result.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["tiny"]["num_layers"] == 2 and config["train"]["max_steps"] == 6
    # Changing a training value re-runs train and what follows, not prepare; with a Hub token in
    # the environment, which no log line and no file of the run may contain.
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN}
    result = cli("run", "--preset", "tiny", "--run-dir", str(run), *TEST_OVERRIDES, "train.max_steps=2", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[prepare] already done" in result.stdout
    for stage in ("train", "merge", "export", "evaluate"):
        assert f"[{stage}] configuration changed since the last run (train); running it again" in result.stdout
    assert json.loads((run / "adapter" / "training_summary.json").read_text())["steps"] == 2
    assert_no_token(run, result.stdout, result.stderr)


def test_report_has_the_hf_section(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    hf = report["hf"]
    # Six steps at a high learning rate on an untrained base: fine-tuning must lower the loss on
    # the validation split and the perplexity on the test split, neither of which it trained on.
    assert hf["adapter_val_loss"] < hf["base_val_loss"]
    assert hf["adapter_ppl"] < hf["base_ppl"]
    assert abs(report["hf"]["adapter_ppl"] - report["hf"]["merged_ppl"]) < 1e-3 * report["hf"]["adapter_ppl"]
    assert "| base + adapter |" in (trained_run / "report.md").read_text()
