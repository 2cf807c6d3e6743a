"""RunLayout names a run folder's paths once; the paths a run records are relative to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_pipeline.layout import RunLayout


def test_paths_recorded_relative_resolve_after_the_folder_moves(tmp_path):
    before, after = RunLayout(tmp_path / "a"), RunLayout(tmp_path / "moved")
    recorded = before.relative(before.gguf("Q4_K_M"))
    assert recorded == "gguf/model-Q4_K_M.gguf"
    assert after.root / recorded == after.gguf("Q4_K_M") == tmp_path / "moved" / "gguf" / "model-Q4_K_M.gguf"


def test_a_path_outside_the_run_is_not_recorded_as_relative(tmp_path):
    with pytest.raises(ValueError):
        RunLayout(tmp_path / "run").relative(tmp_path / "elsewhere.gguf")


def test_the_layout_matches_what_the_stages_declare():
    from qlora_pipeline.pipeline import STAGES

    layout = RunLayout(Path("R"))
    named = {
        layout.relative(p)
        for p in (
            layout.adapter,
            layout.adapter_dpo,
            layout.prefer_log,
            layout.preference_plot,
            layout.merged,
            layout.gguf_dir,
            layout.data,
            layout.train_log,
            layout.loss_plot,
            layout.merge_check,
            layout.report_json,
            layout.report_md,
            layout.scorecard_plot,
        )
    }
    declared = {output for stage in STAGES for output in stage.outputs}
    assert declared == named


def test_large_files_go_to_their_folder_and_come_back_when_it_is_dropped(tmp_path):
    """A Colab run keeps the merged model and GGUFs on the VM's disk; turning Drive off (None) puts
    them back in the run folder, whether or not a folder was ever set."""
    from qlora_pipeline.layout import place_large_files

    run, vm = tmp_path / "drive" / "run", tmp_path / "vm"
    run.mkdir(parents=True)
    place_large_files(run, None)  # never set: nothing to undo
    assert RunLayout(run).merged == run / "merged"
    place_large_files(run, vm)
    assert RunLayout(run).merged == (vm / "merged").resolve() and vm.is_dir()
    place_large_files(run, None)
    assert RunLayout(run).merged == run / "merged"


def test_the_adapter_later_stages_take_follows_prefer_enabled(tmp_path):
    """prefer on: the DPO adapter, or one line naming the stage to run; prefer off: the SFT adapter,
    even when a DPO adapter from another configuration is there."""
    from qlora_pipeline.errors import StageOrderError

    layout = RunLayout(tmp_path)
    with pytest.raises(StageOrderError, match="run `qlora-pipeline prefer"):
        layout.adapter_for(True)
    assert layout.adapter_for(False) == layout.adapter
    layout.adapter_dpo.mkdir(parents=True)
    (layout.adapter_dpo / "adapter_config.json").write_text("{}")
    assert layout.adapter_for(True) == layout.adapter_dpo
    assert layout.adapter_for(False) == layout.adapter


def test_names_under_the_large_folders_resolve_there_and_others_stay_in_the_run(tmp_path):
    from qlora_pipeline.layout import place_large_files

    run, vm = tmp_path / "run", tmp_path / "vm"
    run.mkdir()
    place_large_files(run, vm)
    layout = RunLayout(run)
    assert layout.resolve("merged/config.json") == (vm / "merged" / "config.json").resolve()
    assert layout.resolve("gguf/sub/model.gguf") == (vm / "gguf" / "sub" / "model.gguf").resolve()
    assert layout.resolve("data/train.jsonl") == run / "data" / "train.jsonl"
    assert layout.resolve("merged_check.json") == run / "merged_check.json"
