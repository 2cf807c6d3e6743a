"""Stage records: a stage is skipped only while its config, inputs and output manifest all match."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import copy_run, make_config

from qlora_pipeline.pipeline import STAGE_NAMES, STAGES, run_pipeline


def run_and_log(cfg, run, **kwargs) -> list[str]:
    lines: list[str] = []
    run_pipeline(cfg, run, log=lines.append, **kwargs)
    return lines


def skipped(lines: list[str]) -> list[str]:
    return [s for s in STAGE_NAMES if f"[{s}] already done with this configuration; skipping" in lines]


def test_records_hold_a_manifest_of_every_output(trained_run):
    record = json.loads((trained_run / "stages" / "export.json").read_text())
    files = sorted(p.relative_to(trained_run).as_posix() for p in (trained_run / "gguf").iterdir())
    assert sorted(record["outputs"]) == files
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in record["outputs"].values())
    assert set(record["config"]) == {"data", "tiny", "model", "lora", "train", "prefer", "merge", "export"}


def test_a_changed_output_reruns_its_stage_and_same_files_leave_the_rest_skipped(trained_run, tmp_path, test_config):
    run = copy_run(trained_run, tmp_path / "run")
    first = run_and_log(test_config, run)
    assert skipped(first) == list(STAGE_NAMES), first
    q8 = run / "gguf" / "model-Q8_0.gguf"
    original = q8.read_bytes()
    q8.write_bytes(original[:-100])  # damaged after the stage finished
    lines = run_and_log(test_config, run)
    assert (
        "[export] its output gguf/model-Q8_0.gguf is missing or was changed since it finished; "
        "running it again" in lines
    )
    assert q8.read_bytes() == original  # llama.cpp's quantizer is deterministic
    # export wrote the same files again, so evaluate's inputs did not change
    assert skipped(lines) == ["prepare", "train", "prefer", "merge", "evaluate"]


def test_a_gguf_damaged_in_place_is_exported_again_not_kept(trained_run, tmp_path, test_config):
    """The same size, other bytes: the GGUF manifest checks content (sha256), not only size."""
    run = copy_run(trained_run, tmp_path / "run")
    q8 = run / "gguf" / "model-Q8_0.gguf"
    original = q8.read_bytes()
    middle = len(original) // 2
    q8.write_bytes(original[:middle] + bytes(64) + original[middle + 64 :])
    lines = run_and_log(test_config, run)
    assert q8.read_bytes() == original
    assert skipped(lines) == ["prepare", "train", "prefer", "merge", "evaluate"]


def test_force_reruns_one_stage(trained_run, tmp_path, test_config):
    run = copy_run(trained_run, tmp_path / "run")
    lines = run_and_log(test_config, run, force=("prepare",))
    assert "[prepare] forced to run again" in lines
    assert skipped(lines) == ["train", "prefer", "merge", "export", "evaluate"]  # the same data came out


def test_changed_data_reruns_the_stages_that_read_it(trained_run, tmp_path, test_config):
    run = copy_run(trained_run, tmp_path / "run")
    cfg = make_config("data.val_fraction=0.2")
    lines = run_and_log(cfg, run, until="train")
    assert "[prepare] configuration changed since the last run (data); running it again" in lines
    assert "[train] configuration changed since the last run (data); running it again" in lines
    # Inputs alone: a prepare stage that writes other data (same config) invalidates train.
    (run / "data" / "train.jsonl").write_text((run / "data" / "train.jsonl").read_text().split("\n", 1)[1])
    lines = run_and_log(cfg, run, force=("prepare",), until="train")
    assert "[train] already done with this configuration; skipping" in lines  # prepare restored the same file
    record = run / "stages" / "prepare.json"
    data = json.loads(record.read_text())
    data["outputs"]["data/train.jsonl"]["sha256"] = "0" * 64  # as if prepare had written other data
    record.write_text(json.dumps(data))
    lines = run_and_log(cfg, run, until="train")
    assert "[prepare] already done with this configuration; skipping" in lines  # same size and time: hash trusted
    assert "[train] its inputs changed (an earlier stage wrote different files); running it again" in lines


@pytest.mark.parametrize("stage", [s for s in STAGES if s.after], ids=lambda s: s.name)
def test_a_stage_refuses_to_start_before_the_stages_it_reads(stage, trained_run, test_config, tmp_path):
    """Each stage checks its prerequisites (Stage.after) before it runs: the newest one removed,
    the error names the file and the stage that makes it, and nothing of the stage is written."""
    from qlora_pipeline.errors import StageOrderError
    from qlora_pipeline.pipeline import STAGE_BY_NAME, run_stage

    run = copy_run(trained_run, tmp_path / "run")
    earlier = STAGE_BY_NAME[stage.after[-1]]
    (run / earlier.required[0]).unlink()
    shutil.rmtree(run / "stages")
    for output in stage.outputs:
        (run / output).unlink() if (run / output).is_file() else shutil.rmtree(run / output, ignore_errors=True)
    with pytest.raises(StageOrderError, match=f"{earlier.required[0]} is missing; run `qlora-pipeline {earlier.name}"):
        run_stage(stage.name, test_config, run, log=lambda *a: None)
    assert not any((run / output).exists() for output in stage.outputs)
