"""Training checkpoints: the full state of a run at step N, written atomically, found and resumed.

    RUN/checkpoints/step-NNNNNN/  trainable weights, best weights, optimizer, loop state, manifest

The train stage writes them; the pipeline and the notebooks ask whether one can continue a run
(``find_resumable``, ``training_fingerprint``) without importing the stage.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qlora_pipeline.config import TRAINING_SECTIONS, PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import (
    atomic_dir,
    file_manifest,
    file_sha256,
    folder_bytes,
    manifest_holds,
    recover_interrupted,
    require_free_space,
    write_json_atomic,
)


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def trainable_state(model) -> dict:
    return {name: param.detach().cpu().clone() for name, param in model.named_parameters() if param.requires_grad}


def checkpoint_size_estimate(run_dir: Path, model, with_best: bool) -> int:
    """Bytes the next checkpoint needs: the newest one's size, or (first time) the trainable
    weights times four (weights, AdamW's two moments, the best weights) plus 1 MB."""
    existing = sorted(RunLayout(run_dir).checkpoints.glob("step-*"))
    if existing:
        return folder_bytes(existing[-1])
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights * (4 if with_best else 3) + (1 << 20)


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    state: LoopState,
    best_weights: dict | None,
    keep: int,
    fingerprint: str = "",
    finished: bool = False,
    scaler=None,
) -> Path:
    """Write the full training state to checkpoints/step-N atomically; keep the newest ``keep``.

    Complete or invisible: files go to a temporary folder with a manifest of their sizes and
    sha256, which is fsynced and renamed into place. A full disk is refused before writing
    (or, if it fills during the write, reported) and older checkpoints stay as they were.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file

    final = RunLayout(run_dir).checkpoints / f"step-{state.step:06d}"
    needed = checkpoint_size_estimate(run_dir, model, best_weights is not None)
    require_free_space(final, needed)
    with atomic_dir(final, size_hint=needed) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if best_weights is not None:
            save_file(best_weights, str(tmp / "best.safetensors"))
        # The fp16 loss scaler's scale and growth tracker: a resume that restarted them at 65536
        # would skip steps on overflow again and train differently from an uninterrupted run.
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "optimizer.pt",
        )
        py_state = random.getstate()
        np_state = np.random.get_state()
        write_json_atomic(
            tmp / "loop_state.json",
            {
                **state.__dict__,
                "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "fingerprint": fingerprint,
                "finished": finished,
            },
        )
        manifest = file_manifest(tmp, sorted(file.name for file in tmp.iterdir()))
        write_json_atomic(tmp / "manifest.json", manifest)
    checkpoints = sorted(RunLayout(run_dir).checkpoints.glob("step-*"))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_is_complete(path: Path) -> bool:
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        return False
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(manifest, dict) and manifest_holds(path, manifest, rehash=True)


def latest_checkpoint(run_dir: Path, log=print) -> Path | None:
    for path in sorted(RunLayout(run_dir).checkpoints.glob("step-*"), reverse=True):
        if checkpoint_is_complete(path):
            return path
        log(f"warning: skipping incomplete or corrupt checkpoint {path}")
    return None


def find_resumable(run_dir: Path, fingerprint: str, log=print, required: bool = True) -> Path | None:
    """The newest complete checkpoint, made with this configuration and data; when there is
    none, a clear error (or None when not ``required``)."""
    run_dir = Path(run_dir)
    folder = RunLayout(run_dir).checkpoints
    # what a killed checkpoint write left (".step-N.*.tmp", never complete) goes first
    for name in {leftover.name.split(".")[1] for leftover in folder.glob(".step-*")}:
        recover_interrupted(folder / name)
    checkpoint = latest_checkpoint(run_dir, log=log)
    if checkpoint is None and not required:
        return None
    if checkpoint is None:
        raise PipelineError(f"--resume: no complete checkpoint in {folder}; run without --resume to start over")
    if checkpoint_fingerprint(checkpoint) != fingerprint:
        if not required:
            return None
        raise PipelineError(
            f"--resume: {checkpoint} was made with other training settings or data; "
            "restore them, or run without --resume to start over"
        )
    return checkpoint


def checkpoint_fingerprint(path: Path) -> str:
    return json.loads((path / "loop_state.json").read_text()).get("fingerprint", "")


def checkpoint_finished(path: Path) -> bool:
    """Whether the checkpoint is the end of its run (last step, or stopped early)."""
    return bool(json.loads((path / "loop_state.json").read_text()).get("finished"))


def training_fingerprint(cfg: PipelineConfig, run_dir: Path) -> str:
    """What a checkpoint must have been made with to be resumed: the training configuration
    and the prepared data (resuming on other data or settings would not continue the same run)."""
    import hashlib

    digest = hashlib.sha256(cfg.section_hash(*TRAINING_SECTIONS).encode())
    for split in ("train", "val"):
        digest.update(file_sha256(RunLayout(run_dir).split(split)).encode())
    return digest.hexdigest()[:16]


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> tuple[LoopState, dict | None]:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    raw = json.loads((path / "loop_state.json").read_text())
    raw.pop("fingerprint", None)
    raw.pop("finished", None)
    py_rng = raw.pop("python_rng")
    random.setstate((py_rng[0], tuple(py_rng[1]), py_rng[2]))
    np_rng = raw.pop("numpy_rng")
    np.random.set_state((np_rng[0], np.array(np_rng[1], dtype=np.uint32), *np_rng[2:]))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    return LoopState(**raw), best
