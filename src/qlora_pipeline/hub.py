"""Uploads to the Hugging Face Hub (a Space folder; the notebooks' run parts) and pulling them back.

The token is read from the environment (HF_TOKEN) and never printed or written to a run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import RunLayout


def push_folder(folder: Path, repo_id: str, private: bool = True, repo_type: str = "model") -> str:
    """Upload ``folder`` to ``repo_id`` (a model repo or a Gradio Space; created if needed); return its URL."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PipelineError(
            "HF_TOKEN is not set; create a write token at huggingface.co/settings/tokens "
            "and set it in the environment (Colab: the Secrets panel)"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    space = {"space_sdk": "gradio"} if repo_type == "space" else {}
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **space)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message="Upload from qlora-pipeline"
    )
    return f"https://huggingface.co/{'spaces/' if repo_type == 'space' else ''}{repo_id}"


# ---------------------------------------------------------------------------- run parts between notebooks
# Each Colab notebook runs on its own VM. Besides a RUN_DIR on Google Drive, notebook 1 can push
# the adapter and notebook 2 the merged model to the Hub, as the original course did, and the
# next notebook pulls what its RUN_DIR lacks. The run's config.json travels with each, so the
# next notebook knows the base, the data and the template that the files belong to.
RUN_CONFIG_IN_REPO = "qlora_run_config.json"
PART_MARKERS = {"adapter": "adapter_config.json", "merged": "config.json"}
MODEL_CARD = "README.md"  # the repo's card (qlora-pipeline push), not a file of the part


def push_run_part(run_dir: Path, part: str, repo_id: str | None, enabled: bool) -> str | None:
    """The notebooks' push cell: ``qlora-pipeline push`` of the adapter (notebook 1), the merged
    model (2) or the GGUF files (3, what the Space loads), with a model card and the run's config,
    when asked."""
    if not enabled or not repo_id:
        print("not pushing (set PUSH_TO_HUB = True and HUB_REPO in the parameters cell)")
        return None
    if not os.environ.get("HF_TOKEN"):
        print("not pushing: HF_TOKEN is not set")
        return None
    from qlora_pipeline.publish import push

    url = push(Path(run_dir), repo_id, part)
    print(f"pushed {part} to {url}")
    return url


def pull_run_part(run_dir: Path, part: str, repo_id: str | None, cache_dir: str | None = None, log=print) -> bool:
    """Fetch RUN_DIR/part (and the run's config.json, if RUN_DIR has none) from ``repo_id`` when
    RUN_DIR lacks it; False when it was already there. A clear error when it is missing and no
    repo is named."""
    import shutil

    from qlora_pipeline.paths import atomic_dir

    run_dir = Path(run_dir)
    if (run_dir / part / PART_MARKERS[part]).is_file():
        return False
    if not repo_id:
        raise PipelineError(
            f"{run_dir / part} is missing: run the previous notebook with this RUN_DIR (on Colab: "
            "the same Google Drive), or set HUB_REPO to the Hub repo it pushed the "
            f"{part} to"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, token=os.environ.get("HF_TOKEN")))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise PipelineError(
            f"could not download {repo_id!r} from the Hub ({str(exc).splitlines()[0][:160]}); "
            "check HUB_REPO and, for a private repo, HF_TOKEN"
        ) from None
    if not (snapshot / PART_MARKERS[part]).is_file():
        raise PipelineError(
            f"the Hub repo {repo_id!r} has no {PART_MARKERS[part]}: it does not hold a {part}; check HUB_REPO"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(run_dir / part) as tmp:
        for file in snapshot.rglob("*"):
            if file.is_file() and file.name not in (RUN_CONFIG_IN_REPO, MODEL_CARD) and ".cache" not in file.parts:
                dest = tmp / file.relative_to(snapshot)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, dest)  # real files: the cache's symlinks would dangle on Drive
    run_config = snapshot / RUN_CONFIG_IN_REPO
    if run_config.is_file() and not RunLayout(run_dir).config.is_file():
        from qlora_pipeline.paths import write_text_atomic

        write_text_atomic(RunLayout(run_dir).config, run_config.read_text(encoding="utf-8"))
    log(f"pulled the {part} from https://huggingface.co/{repo_id} into {run_dir / part}")
    return True
