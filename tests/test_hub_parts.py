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


def _adapter_files(trained_run, prefix: str = "") -> dict:
    return {f"{prefix}{f.name}": f for f in (trained_run / "adapter").iterdir() if f.is_file()}


def test_the_adapter_repos_dpo_folder_becomes_the_runs_dpo_adapter(trained_run, tmp_path):
    """Notebook 1 pushes the DPO adapter under dpo/ of the adapter repo; the next VM gets it back as
    RUN/adapter-dpo (not inside RUN/adapter), keeps one it already has, and makes none when the repo
    has none."""
    from qlora_pipeline.hub import pull_run_part
    from qlora_pipeline.hub_twin import write_cached_repo

    cache = tmp_path / "hub"
    write_cached_repo(
        cache, "model", "s/with-dpo", {**_adapter_files(trained_run), **_adapter_files(trained_run, "dpo/")}
    )
    write_cached_repo(cache, "model", "s/sft-only", _adapter_files(trained_run))
    quiet = {"cache_dir": str(cache), "log": lambda *a: None}

    run = tmp_path / "a"
    assert pull_run_part(run, "adapter", "s/with-dpo", **quiet)
    assert sorted(p.name for p in (run / "adapter-dpo").iterdir()) == sorted(_adapter_files(trained_run))
    assert not (run / "adapter" / "dpo").exists()

    run = tmp_path / "b"
    assert pull_run_part(run, "adapter", "s/sft-only", **quiet)
    assert not (run / "adapter-dpo").exists()

    run = tmp_path / "c"  # a DPO adapter already on Drive stays as it is
    (run / "adapter-dpo").mkdir(parents=True)
    kept = run / "adapter-dpo" / "adapter_config.json"
    kept.write_text('{"kept": true}')
    assert pull_run_part(run, "adapter", "s/with-dpo", **quiet)
    assert kept.read_text() == '{"kept": true}'


def test_a_pull_into_an_existing_run_folder_copies_real_files_where_links_fail(trained_run, tmp_path, monkeypatch):
    """On Colab the run folder exists (on Drive) and the Hub cache is on another disk, where a hard
    link fails: every file, nested ones included, arrives as a copy with the same bytes; the run's
    own config is kept."""
    import os

    from qlora_pipeline import hub
    from qlora_pipeline.hub_twin import write_cached_repo

    cache = tmp_path / "hub"
    notes = tmp_path / "notes.txt"
    notes.write_text("nested")
    files = {**_adapter_files(trained_run), hub.RUN_CONFIG_IN_REPO: trained_run / "config.json"}
    write_cached_repo(cache, "model", "s/adapter", {**files, "extra/deeper/notes.txt": notes})
    run = tmp_path / "drive" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"mine": true}')

    def no_links(*args):
        raise OSError("Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert hub.pull_run_part(run, "adapter", "s/adapter", cache_dir=str(cache), log=lambda *a: None)
    for name, source in _adapter_files(trained_run).items():
        if name == "README.md":  # peft's card: the repo's own card replaces it, and is not pulled
            continue
        placed = run / "adapter" / name
        assert not placed.is_symlink() and placed.read_bytes() == source.read_bytes()
    assert (run / "adapter" / "extra" / "deeper" / "notes.txt").read_text() == "nested"
    assert (run / "config.json").read_text() == '{"mine": true}'


def test_a_pull_downloads_with_the_students_token(trained_run, tmp_path, monkeypatch):
    """A private repo needs the token: the one huggingface_hub finds (here HF_TOKEN) goes with the call."""
    import huggingface_hub

    from qlora_pipeline.hub import pull_run_part
    from qlora_pipeline.hub_twin import write_cached_repo

    cache = tmp_path / "hub"
    write_cached_repo(cache, "model", "s/adapter", _adapter_files(trained_run))
    real, tokens = huggingface_hub.snapshot_download, []

    def recording(repo_id, **kwargs):
        tokens.append(kwargs.get("token"))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    monkeypatch.setenv("HF_TOKEN", "hf_student_secret")
    said = []
    assert pull_run_part(tmp_path / "run", "adapter", "s/adapter", cache_dir=str(cache), log=said.append)
    assert tokens == ["hf_student_secret"]
    assert said == [f"pulled the adapter from https://huggingface.co/s/adapter into {tmp_path / 'run' / 'adapter'}"]
