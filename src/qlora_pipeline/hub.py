"""Optional upload of an adapter or merged model to the Hugging Face Hub.

The token is read from the environment (HF_TOKEN) and never printed or written to a run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from qlora_pipeline.errors import PipelineError


def push_folder(folder: Path, repo_id: str, private: bool = True, repo_type: str = "model") -> str:
    """Upload ``folder`` to the repo ``repo_id`` (a model repo, or a Gradio Space; created if needed); return its URL."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PipelineError("HF_TOKEN is not set; create a write token at huggingface.co/settings/tokens "
                            "and set it in the environment (Colab: the Secrets panel)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    space = {"space_sdk": "gradio"} if repo_type == "space" else {}
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **space)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                      commit_message="Upload from qlora-pipeline")
    return f"https://huggingface.co/{'spaces/' if repo_type == 'space' else ''}{repo_id}"


def push_if_asked(folder: Path, repo_id: str | None, enabled: bool) -> str | None:
    """The notebooks' push cell: does nothing unless enabled, a repo is named and a token is present."""
    if not enabled or not repo_id:
        print("not pushing (set PUSH_TO_HUB = True and HUB_REPO in the parameters cell)")
        return None
    if not os.environ.get("HF_TOKEN"):
        print("not pushing: HF_TOKEN is not set")
        return None
    url = push_folder(Path(folder), repo_id)
    print(f"pushed {folder} to {url}")
    return url
