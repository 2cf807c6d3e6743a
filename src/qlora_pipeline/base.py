"""The base model: where it comes from (a folder, a Hub id, or the built-in tiny one) and its size.

from qlora_pipeline.base import resolve_base
"""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import ModelError


def resolve_base(cfg: PipelineConfig, log=print) -> str:
    """The local folder or Hub id of the base model; builds the tiny one when asked for."""
    if cfg.model.name_or_path == "tiny":
        from qlora_pipeline.tiny import ensure_tiny_base

        return str(ensure_tiny_base(cfg.tiny, log=log))
    path = Path(cfg.model.name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; point model.name_or_path at a saved model folder")
        if not (path / "tokenizer.model").is_file():  # found now, not after hours of training
            raise ModelError(
                f"{path} has no tokenizer.model; llama.cpp's Phi-3 converter needs this SentencePiece "
                "file: copy it from the base model's repository into the folder"
            )
        return str(path)
    return cfg.model.name_or_path


def local_base_dir(base: str, revision: str | None) -> Path:
    """A folder holding the base's files: the base itself, or its Hub snapshot (weights + configs)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            base, revision=revision, allow_patterns=["*.safetensors", "*.json", "tokenizer.model", "*.jinja"]
        )
    )


def base_weight_bytes(base: str, revision: str | None) -> int | None:
    """Size of a local base's safetensors weights (None for a Hub id not downloaded yet)."""
    folder = Path(base)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def base_bytes_guess(base: str, revision: str | None) -> int:
    size = base_weight_bytes(base, revision)
    if size is None:  # a Hub id: Phi-3.5-mini is 7.6 GB; decide on the free memory alone
        size = 7_600_000_000 if "phi-3" in base.lower() else 0
    return size
