"""The student's journey, seam by seam and fast (``make journey`` plays it whole): the token from
Colab's secret through huggingface_hub's own lookup, repo names derived from it, a push asked for
without a token, and what one notebook pushes is what the next one pulls, through the real client
against the Hub stand-in. Each runs in a fresh process: huggingface_hub reads ``HF_ENDPOINT`` and
whether it runs under Colab when it is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from qlora_pipeline.course.hub_standin import serve

STANDIN = REPO / "tests" / "helpers" / "colab_standin"
TOKEN = "hf_secret_of_the_student"

# Colab's kernel: huggingface_hub reads the Colab secret only when str(get_ipython()) names
# google.colab (its utils/_runtime.py), and Colab has google.colab imported from the start.
AS_COLAB = """
import builtins
class Shell:
    pass
Shell.__module__ = "google.colab._shell"
builtins.get_ipython = lambda: Shell()
import google.colab
"""


@pytest.fixture
def hub():
    server = serve("student")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def as_colab(code: str, tmp_path: Path, hub_url: str | None = None, secrets: dict | None = None):
    """Run ``code`` in a fresh process that looks like a Colab kernel with these secrets."""
    (tmp_path / "secrets.json").write_text(json.dumps(secrets or {}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(
        PYTHONPATH=str(STANDIN),
        HF_HOME=str(tmp_path / "root" / ".cache" / "huggingface"),  # where Colab keeps it; no login cache
        HF_HUB_DISABLE_TELEMETRY="1",
        COLAB_STANDIN_SECRETS=str(tmp_path / "secrets.json"),
        COLAB_STANDIN_LOG=str(tmp_path / "events.jsonl"),
    )
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    return subprocess.run(
        [sys.executable, "-c", AS_COLAB + code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )


def test_the_token_is_found_in_the_colab_secret_and_never_printed(tmp_path, hub):
    code = """
from qlora_pipeline.hub import course_repos, hub_token
assert hub_token() == "hf_secret_of_the_student"
repos = course_repos("runs/notebooks/s29")
print(repos)
"""
    result = as_colab(code, tmp_path, hub, {"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Hub: pushing as student (public repos" in result.stdout
    assert "adapter='student/phi35-oasst1-s29-adapter'" in result.stdout
    assert "space='student/phi35-oasst1-s29-space'" in result.stdout and "push=True" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert {"event": "userdata.get", "key": "HF_TOKEN", "found": True}.items() <= events[0].items()


def test_without_a_token_nothing_is_pushed_and_asking_for_a_push_is_one_line_error(tmp_path):
    code = """
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.hub import course_repos
from qlora_pipeline.publish import push_run_part
repos = course_repos("runs/notebooks/s29")
assert not repos.push and repos.adapter is None
assert push_run_part("runs/notebooks/s29", "adapter", repos) is None
try:
    course_repos("runs/notebooks/s29", push=True)  # PUSH_TO_HUB = True
except PipelineError as exc:
    print("ERROR:", exc)
"""
    result = as_colab(code, tmp_path, secrets={})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Hub: no token found, so nothing is pushed" in result.stdout
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert "PUSH_TO_HUB = True needs a Hugging Face token" in error and "Colab secret HF_TOKEN" in error


def test_what_notebook_2_pushes_is_what_notebook_3_pulls_with_drive_off(tmp_path, hub, trained_run):
    """The merged model's repo carries merge_check.json (export requires it) and the run config;
    a fresh run folder pulled from the Hub alone passes export's prerequisite check."""
    code = f"""
import filecmp
from pathlib import Path
from qlora_pipeline.hub import course_repos, pull_run_part
from qlora_pipeline.publish import push_run_part
from qlora_pipeline.pipeline import STAGE_BY_NAME, check_prerequisites
repos = course_repos("s29")
push_run_part({str(trained_run)!r}, "adapter", repos)
push_run_part({str(trained_run)!r}, "merged", repos)
fresh = Path("vm-3/s29")
assert pull_run_part(fresh, "adapter", repos.adapter, log=print)
assert pull_run_part(fresh, "merged", repos.merged, log=print)
check_prerequisites(STAGE_BY_NAME["export"], fresh)
trained = Path({str(trained_run)!r})
for name in ("merge_check.json", "merged/config.json", "merged/model.safetensors", "adapter/adapter_config.json",
             "adapter-dpo/adapter_model.safetensors"):
    assert filecmp.cmp(trained / name, fresh / name, shallow=False), name
print("pulled", sorted(p.name for p in fresh.iterdir()))
"""
    result = as_colab(code, tmp_path, hub, {"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pulled ['adapter', 'adapter-dpo', 'config.json', 'merge_check.json', 'merged']" in result.stdout


def test_notebook_3_publishes_a_space_that_serves_the_pushed_models(tmp_path, hub, trained_run):
    """The Space gets its MODEL_REPO as a Space variable through the Hub API, a private one the
    token as a secret; the models it then lists are the pushed quantized GGUFs."""
    code = f"""
from qlora_pipeline.hub import course_repos
from qlora_pipeline.publish import push_run_part
from qlora_pipeline.space import publish_space
from qlora_pipeline.serve.sources import hub_choices
from huggingface_hub import HfApi
repos = course_repos("s29", private=True)
push_run_part({str(trained_run)!r}, "gguf", repos)
print("URL", publish_space(repos.space, repos.gguf, repos.private))
api = HfApi()
print("VARIABLES", {{k: v.value for k, v in api.get_space_variables(repos.space).items()}})
print("FILES", sorted(api.list_repo_files(repos.space, repo_type="space")))
choices, default = hub_choices(repos.gguf, [], memory=16_000_000_000)
print("CHOICES", [c.name for c in choices], default)
"""
    result = as_colab(code, tmp_path, hub, {"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"URL {hub}/spaces/student/phi35-oasst1-s29-space" in out
    assert "VARIABLES {'MODEL_REPO': 'student/phi35-oasst1-s29-gguf'}" in out
    assert "'app.py'" in out and "'qlora_pipeline/serve/chat_app.py'" in out and "'requirements.txt'" in out
    assert "CHOICES ['model-Q4_K_M.gguf', 'model-Q8_0.gguf'] model-Q4_K_M.gguf" in out  # the run's quantized types
    state = json.loads(__import__("urllib.request").request.urlopen(f"{hub}/_standin/state").read())
    space = state["spaces/student/phi35-oasst1-s29-space"]
    assert space["private"] and space["secrets"] == ["HF_TOKEN"]
    assert "model-F16.gguf" not in state["student/phi35-oasst1-s29-gguf"]["files"]


def test_the_drive_estimate_counts_lora_parameters_as_peft_makes_them(trained_run):
    """The journey scales the adapter and checkpoints by LoRA parameters (Phi-3.5 against the
    twin): the count from config.json must be what peft actually saved for the run."""
    import math

    from safetensors import safe_open

    from qlora_pipeline.course.journey import lora_parameters

    run_config = json.loads((trained_run / "config.json").read_text())
    with safe_open(str(trained_run / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        saved = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    base_config = json.loads((trained_run / "merged" / "config.json").read_text())
    assert lora_parameters(base_config, run_config["lora"]["r"]) == saved
