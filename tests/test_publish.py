"""``qlora-pipeline push``: the model card (front matter parsed by huggingface_hub's ModelCard)
and the upload, exercised by dependency injection: a stand-in for ``HfApi`` records the repo
and the commit instead of sending them (no network here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_pipeline import publish
from qlora_pipeline.errors import ConfigError


class RecordingApi:
    """What ``push`` asks of ``HfApi``: one repo, one commit with every file and the card."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits.append((repo_id, operations, kwargs))


@pytest.fixture
def hub_run(trained_run, tmp_path):
    """The trained run as if its base were the real Phi-3.5 on the Hub (the card names it)."""
    run = tmp_path / "run"
    run.mkdir()
    for part in ("adapter", "merged", "gguf"):
        (run / part).symlink_to(trained_run / part)
    config = json.loads((trained_run / "config.json").read_text())
    config["model"]["name_or_path"] = "microsoft/Phi-3.5-mini-instruct"
    (run / "config.json").write_text(json.dumps(config))
    shutil.copyfile(trained_run / "report.json", run / "report.json")
    shutil.copyfile(trained_run / "merge_check.json", run / "merge_check.json")
    return run


@pytest.mark.parametrize(
    "what, relation, library, expected_file",
    [
        ("adapter", "adapter", "peft", "adapter_model.safetensors"),
        ("merged", "merge", "transformers", "config.json"),
        ("gguf", "quantized", "gguf", "model-Q4_K_M.gguf"),
    ],
)
def test_push_commits_the_files_with_a_card_that_model_card_parses(hub_run, what, relation, library, expected_file):
    from huggingface_hub import ModelCard

    api = RecordingApi()
    url = publish.push(hub_run, "you/phi35-oasst1", what, api=api)
    assert url == "https://huggingface.co/you/phi35-oasst1"
    # public by default: a course fine-tune of an MIT-licensed model, which the Space reads without a token
    assert api.repos == [("you/phi35-oasst1", {"private": False, "exist_ok": True, "repo_type": "model"})]
    ((_, operations, _),) = api.commits
    paths = {op.path_in_repo: op for op in operations}
    assert expected_file in paths and "README.md" in paths
    assert "manifest.json" not in paths
    assert [op.path_in_repo for op in operations].count("README.md") == 1  # peft's own card is not pushed too
    card = ModelCard(paths["README.md"].path_or_fileobj.decode())
    data = card.data.to_dict()
    assert data["base_model"] == "microsoft/Phi-3.5-mini-instruct"
    assert data["base_model_relation"] == relation
    assert data["library_name"] == library
    assert data["datasets"] == ["OpenAssistant/oasst1"] and data["license"] == "mit"
    assert "## Training" in card.text and "learning rate" in card.text
    assert "## Quantization scorecard" in card.text  # the run's own table
    if what == "gguf":
        assert "Modelfile" in paths and "ollama create" in card.text and "MODEL_REPO=you/phi35-oasst1" in card.text
        assert "The chat Space serves `model-Q4_K_M.gguf`" in card.text
        assert "model-F16.gguf" not in paths  # the reference goes only when asked (--include F16)
        listed = json.loads(paths["gguf_models.json"].path_or_fileobj)["models"]
        assert set(listed) == {name for name in paths if name.endswith(".gguf")}
        assert all(entry["bytes"] == (hub_run / "gguf" / name).stat().st_size for name, entry in listed.items())
    if what == "merged":
        assert "merge_check.json" in paths  # export refuses to start without the merge's own check


def test_push_gguf_leaves_out_what_the_space_cannot_serve_unless_asked(trained_run, tmp_path):
    """F16, base, LoRA adapter and importance matrix stay behind by default; ``include`` adds them,
    and the Space's list (gguf_models.json) names only files whose own general.type is a model."""
    import gguf

    run = tmp_path / "run"
    shutil.copytree(trained_run / "gguf", run / "gguf")
    writer = gguf.GGUFWriter(str(run / "gguf" / "imatrix.gguf"), arch="phi3")
    writer.add_type("imatrix")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    default = publish.files_to_push(run, "gguf")
    assert "model-F16.gguf" not in default and "imatrix.gguf" not in default
    assert {"model-Q4_K_M.gguf", "Modelfile"} <= set(default)
    everything = publish.files_to_push(run, "gguf", include=("F16", "imatrix"))
    assert {"model-F16.gguf", "imatrix.gguf"} <= set(everything)
    assert set(publish.models_manifest(everything)["models"]) == {n for n in everything if n.startswith("model-")}
    with pytest.raises(ConfigError, match="--include 'Q4' is invalid"):
        publish.files_to_push(run, "gguf", include=("Q4",))


def test_the_card_of_a_tiny_run_names_no_hub_base(trained_run):
    from huggingface_hub import ModelCard

    files = publish.files_to_push(trained_run, "gguf")
    card = ModelCard(publish.render_card(trained_run, "you/tiny", "gguf", files))
    assert "base_model" not in card.data.to_dict()
    assert "`tiny`" in card.text


def test_the_card_gives_the_importance_matrix_figures(hub_run):
    report = json.loads((hub_run / "report.json").read_text())
    plain = report["gguf"]["Q4_K_M"]
    report["gguf"]["Q4_K_M-imat"] = {**plain, "kld_vs_f16": plain["kld_vs_f16"] * 0.9}
    (hub_run / "report.json").write_text(json.dumps(report))
    card = publish.render_card(hub_run, "you/x", "gguf", publish.files_to_push(hub_run, "gguf"))
    assert "- Q4_K_M: KL" in card and "(-10.0%)" in card


def test_bad_requests_are_refused_before_any_upload(trained_run, tmp_path, monkeypatch):
    api = RecordingApi()
    with pytest.raises(ConfigError, match="--what 'weights' is invalid"):
        publish.push(trained_run, "you/x", "weights", api=api)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Exception, match="has no adapter files to push"):
        publish.push(tmp_path, "you/x", "adapter", api=api)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no login cache either
    with pytest.raises(Exception, match="needs a Hugging Face token: create a write token"):
        publish.push(trained_run, "you/x", "gguf")
    assert api.repos == [] and api.commits == []


def test_what_push_commits_is_what_the_next_notebook_pulls(trained_run, tmp_path):
    """Notebook 1 pushes the adapter; notebook 2, on a fresh VM, pulls it back with the run's config."""
    from qlora_pipeline.hub import pull_run_part
    from qlora_pipeline.hub_twin import write_cached_repo
    from qlora_pipeline.pipeline import read_run_config

    api = RecordingApi()
    publish.push(trained_run, "student/adapter", "adapter", api=api)
    ((_, operations, _),) = api.commits
    files = {}
    for op in operations:
        if isinstance(op.path_or_fileobj, bytes):
            (tmp_path / op.path_in_repo).write_bytes(op.path_or_fileobj)
            files[op.path_in_repo] = tmp_path / op.path_in_repo
        else:
            files[op.path_in_repo] = op.path_or_fileobj
    write_cached_repo(tmp_path / "hub", "model", "student/adapter", {k: Path(v) for k, v in files.items()})
    run = tmp_path / "fresh"
    assert pull_run_part(run, "adapter", "student/adapter", cache_dir=str(tmp_path / "hub"), log=lambda *a: None)
    assert read_run_config(run) == read_run_config(trained_run)
    pulled = sorted(p.name for p in (run / "adapter").iterdir())
    pushed = sorted(p.name for p in (trained_run / "adapter").iterdir() if p.is_file() and p.name != "README.md")
    assert pulled == pushed  # peft's own README.md gives way to the generated card, which stays on the Hub


def test_hidden_files_in_a_part_are_not_pushed(trained_run, tmp_path):
    """A killed write's hidden temporary (``.model.safetensors.tmp``) or a desktop's ``.DS_Store``
    never reach the Hub; peft's own README is replaced by the generated card."""
    run = tmp_path / "run"
    shutil.copytree(trained_run / "adapter", run / "adapter")
    shutil.copy(trained_run / "config.json", run / "config.json")
    (run / "adapter" / ".adapter_model.safetensors.tmp").write_bytes(b"partial")
    (run / "adapter" / ".DS_Store").write_bytes(b"x")
    names = set(publish.files_to_push(run, "adapter"))
    assert not any(name.startswith(".") for name in names)
    assert "adapter_model.safetensors" in names and "README.md" not in names
