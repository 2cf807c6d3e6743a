"""Notebook 2 and 3 fetch what their RUN_DIR lacks from the Hub repo notebook 1 or 2 pushed to,
checked offline against a repo laid out as huggingface_hub's cache."""

from __future__ import annotations

import json

import pytest


def _cached_adapter_repo(trained_run, cache):
    from qlora_pipeline.hub import RUN_CONFIG_IN_REPO
    from qlora_pipeline.hub_twin import write_cached_repo

    files = {f.name: f for f in (trained_run / "adapter").iterdir() if f.is_file()}
    files[RUN_CONFIG_IN_REPO] = trained_run / "config.json"
    write_cached_repo(cache, "model", "student/phi35-oasst1-adapter", files)


def test_a_fresh_run_dir_gets_the_adapter_and_the_run_config_from_the_hub(trained_run, tmp_path):
    from qlora_pipeline.hub import pull_run_part
    from qlora_pipeline.model import check_adapter_files
    from qlora_pipeline.pipeline import read_run_config

    cache = tmp_path / "hub"
    _cached_adapter_repo(trained_run, cache)
    run_dir = tmp_path / "drive" / "s29"
    assert pull_run_part(run_dir, "adapter", "student/phi35-oasst1-adapter", cache_dir=str(cache), log=lambda *a: None)
    check_adapter_files(run_dir / "adapter")  # a complete safetensors file, a real file (not a cache link)
    assert not any(f.is_symlink() for f in (run_dir / "adapter").iterdir())
    assert read_run_config(run_dir) == read_run_config(trained_run)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (trained_run / "adapter" / "adapter_config.json").read_text()
    )
    # A second call finds it and downloads nothing.
    assert not pull_run_part(run_dir, "adapter", "student/phi35-oasst1-adapter", cache_dir=str(tmp_path / "none"))


def test_a_missing_part_without_a_repo_says_which_notebook_to_run(tmp_path):
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.hub import pull_run_part

    with pytest.raises(PipelineError, match="run the previous notebook with this RUN_DIR.*set MERGED_REPO"):
        pull_run_part(tmp_path / "run", "merged", None)
    assert not (tmp_path / "run" / "merged").exists()


def test_a_repo_that_is_not_there_is_a_clear_error(tmp_path):
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.hub import pull_run_part

    with pytest.raises(PipelineError, match="could not download 'student/nothing-here'.*check ADAPTER_REPO"):
        pull_run_part(tmp_path / "run", "adapter", "student/nothing-here", cache_dir=str(tmp_path / "hub"))
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_repo_holding_something_else_is_refused(trained_run, tmp_path):
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.hub import pull_run_part

    cache = tmp_path / "hub"
    _cached_adapter_repo(trained_run, cache)
    with pytest.raises(PipelineError, match="has no config.json: it does not hold a merged"):
        pull_run_part(tmp_path / "run", "merged", "student/phi35-oasst1-adapter", cache_dir=str(cache))
    assert not (tmp_path / "run" / "merged").exists()
