"""The prefer stage (DPO with TRL): which adapter the later stages take, its hand-off through the
Hub, its errors, and a kill in the middle of it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TEST_OVERRIDES, copy_run

from qlora_pipeline.errors import DataError
from qlora_pipeline.layout import RunLayout


def lora_delta(adapter: Path, module: str):
    """(alpha / r) * B @ A of one module, from an adapter's safetensors file."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    a = next(t for k, t in weights.items() if module in k and "lora_A" in k).float()
    b = next(t for k, t in weights.items() if module in k and "lora_B" in k).float()
    return config["lora_alpha"] / config["r"] * (b @ a)


def merged_delta(run: Path, base: Path, module: str):
    from safetensors.torch import load_file

    merged = load_file(str(next((run / "merged").glob("*.safetensors"))))
    original = load_file(str(next(base.glob("*.safetensors"))))
    key = next(k for k in merged if module in k and k.endswith("weight"))
    return merged[key].float() - original[key].float()


MODULE = "layers.0.self_attn.qkv_proj"


def test_the_merged_model_carries_the_dpo_adapter_when_the_stage_ran(trained_run, tiny_base):
    layout = RunLayout(trained_run)
    assert layout.has_dpo_adapter
    merged = merged_delta(trained_run, tiny_base, MODULE)
    dpo, sft = lora_delta(layout.adapter_dpo, MODULE), lora_delta(layout.adapter, MODULE)
    assert (dpo - sft).abs().max() > 1e-5  # DPO moved the adapter, so the two merges differ
    assert (merged - dpo).abs().max() < (merged - sft).abs().max() / 10
    assert json.loads(layout.merge_check.read_text())["adapter"] == "adapter-dpo"
    report = json.loads(layout.report_json.read_text())
    pref = report["preference"]
    assert pref["pairs"] == 6 and set(pref) >= {"base", "sft", "dpo", "sft_val_loss"}
    assert pref["dpo"]["reference"] == "sft" and pref["sft"]["reference"] == "base"
    assert "## Preference tuning" in layout.report_md.read_text()


def test_without_the_stage_merge_takes_the_sft_adapter(trained_run, tiny_base, tmp_path):
    from conftest import make_config

    from qlora_pipeline.pipeline import run_pipeline

    run = copy_run(trained_run, tmp_path / "run")
    run_pipeline(make_config("prefer.enabled=false"), run, log=lambda *a: None, until="merge")
    layout = RunLayout(run)
    assert not layout.adapter_dpo.exists() and not layout.preference_plot.exists()
    assert not layout.has_dpo_adapter
    assert json.loads(layout.merge_check.read_text())["adapter"] == "adapter"
    merged = merged_delta(run, tiny_base, MODULE)
    assert (merged - lora_delta(layout.adapter, MODULE)).abs().max() < 1e-3


def test_evaluate_reports_preference_only_when_the_stage_is_on(trained_run, tmp_path, monkeypatch):
    from conftest import make_config

    import qlora_pipeline.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate_hf", lambda *a, **k: None)
    monkeypatch.setattr(evaluate, "evaluate_gguf", lambda cfg, run_dir, log: evaluate.read_report(run_dir))
    run = copy_run(trained_run, tmp_path / "run")
    assert "preference" in evaluate.evaluate(make_config(), run)
    assert "preference" not in evaluate.evaluate(make_config("prefer.enabled=false"), run)


def test_with_the_stage_on_a_missing_dpo_adapter_stops_merge_with_one_line(trained_run, tmp_path, test_config):
    from qlora_pipeline.errors import StageOrderError
    from qlora_pipeline.pipeline import run_stage

    run = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(RunLayout(run).adapter_dpo)
    with pytest.raises(StageOrderError, match=r"adapter-dpo is missing and prefer.enabled is on; run `qlora-pipeline "):
        run_stage("merge", test_config, run)
    assert RunLayout(run).adapter_for(False) == RunLayout(run).adapter


def test_the_adapter_repo_carries_the_dpo_adapter_to_the_next_notebook(trained_run, tmp_path):
    from qlora_pipeline.hub import DPO_SUBFOLDER, RUN_CONFIG_IN_REPO, pull_run_part
    from qlora_pipeline.hub_twin import write_cached_repo
    from qlora_pipeline.publish import files_to_push

    files = files_to_push(trained_run, "adapter")
    assert f"{DPO_SUBFOLDER}/adapter_model.safetensors" in files and "adapter_model.safetensors" in files
    write_cached_repo(
        tmp_path / "hub", "model", "student/a", {**files, RUN_CONFIG_IN_REPO: trained_run / "config.json"}
    )
    run = tmp_path / "drive" / "s29"
    pull_run_part(run, "adapter", "student/a", cache_dir=str(tmp_path / "hub"), log=lambda *a: None)
    layout, source = RunLayout(run), RunLayout(trained_run)
    assert layout.has_dpo_adapter
    for folder, original in ((layout.adapter, source.adapter), (layout.adapter_dpo, source.adapter_dpo)):
        weights = folder / "adapter_model.safetensors"
        assert weights.read_bytes() == (original / "adapter_model.safetensors").read_bytes()
    assert not (layout.adapter / DPO_SUBFOLDER).exists()  # not nested inside the SFT adapter


def test_bad_pairs_stop_the_stage_with_one_line_before_a_model_loads(trained_run, tmp_path, test_config):
    from qlora_pipeline.pipeline import run_stage

    run = copy_run(trained_run, tmp_path / "run")
    RunLayout(run).pairs("train").write_text('{"prompt": "not messages"}\n')
    with pytest.raises(DataError, match=r"pairs-train.jsonl:1: a pair needs prompt, chosen, rejected") as info:
        run_stage("prefer", test_config, run)
    assert "\n" not in str(info.value)
    assert (RunLayout(run).adapter_dpo / "adapter_config.json").is_file()  # the previous result stays whole


def _prefer_command(run: Path, *extra: str) -> list[str]:
    overrides = [o for o in TEST_OVERRIDES if not o.startswith("prefer.")]
    return [sys.executable, "-m", "qlora_pipeline.cli", "prefer", "--run-dir", str(run), "--preset", "tiny",
            *overrides, "prefer.max_steps=6", "prefer.checkpoint_every=2", "prefer.eval_every=3",
            "prefer.batch_size=2", "prefer.eval_max_pairs=4", *extra]  # fmt: skip


def test_a_kill_during_the_stage_resumes_from_its_newest_checkpoint(trained_run, tmp_path):
    from qlora_pipeline.prefer import complete_checkpoints

    run = copy_run(trained_run, tmp_path / "run")
    layout = RunLayout(run)
    shutil.rmtree(layout.prefer_checkpoints)  # the fixture's own (other settings): only this run's count
    process = subprocess.Popen(_prefer_command(run), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if [c.name for c in complete_checkpoints(layout.prefer_checkpoints)] >= ["checkpoint-2"]:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = complete_checkpoints(layout.prefer_checkpoints)
    assert done and done[-1].name != "checkpoint-6", "the kill came too late to test a resume"
    resumed = subprocess.run(_prefer_command(run), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing from {done[-1].name}" in resumed.stdout
    log = [json.loads(line) for line in layout.prefer_log.read_text().splitlines()]
    assert max(row["step"] for row in log) == 6
    assert sorted({row["step"] for row in log if "loss" in row}) == [1, 2, 3, 4, 5, 6]  # no step lost or doubled
    assert json.loads((layout.adapter_dpo / "preference.json").read_text())["steps"] == 6
    fresh = subprocess.run(_prefer_command(run, "--fresh"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and "continuing from" not in fresh.stdout


def test_the_cards_say_the_models_carry_the_dpo_adapter(trained_run):
    from qlora_pipeline import publish

    gguf = publish.render_card(trained_run, "you/tiny-gguf", "gguf", publish.files_to_push(trained_run, "gguf"))
    assert "Then preference tuning: DPO (TRL, loss sigmoid, beta 0.1)" in gguf
    adapter = publish.render_card(trained_run, "you/a", "adapter", publish.files_to_push(trained_run, "adapter"))
    assert 'from_pretrained("you/a", subfolder="dpo")' in adapter
