"""Every path of a run folder, named once.

    RUN/
      config.json            the run's configuration (pipeline.save_run_config)
      stages/<stage>.json    what each finished stage was run with (pipeline)
      data/{train,val,test}.jsonl, data/stats.json          prepare
      checkpoints/step-NNNNNN/, train_log.jsonl, loss.png    train
      adapter/               the LoRA adapter and training_summary.json           train
      merged/, merge_check.json                              merge
      gguf/model-<TYPE>.gguf, gguf/manifest.json             export
      report.json, report.md, scorecard.png                  evaluate
      time_estimate.json     the notebooks' time estimates (timing)

Paths written into ``report.json`` are relative to the run folder (``RunLayout.relative``), so a
run folder can be moved or copied whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- the run as a whole
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_record(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    # -- prepare
    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    # -- train
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    # -- merge
    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def merge_check(self) -> Path:
        return self.root / "merge_check.json"

    # -- export
    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    def gguf(self, variant: str) -> Path:
        """The GGUF file of one variant (``F16``, ``Q4_K_M``, ``Q4_K_M-imat``, ...)."""
        return self.gguf_dir / f"model-{variant}.gguf"

    @property
    def gguf_manifest(self) -> Path:
        return self.gguf_dir / "manifest.json"

    @property
    def modelfile(self) -> Path:
        """Ollama's Modelfile for the chosen variant."""
        return self.gguf_dir / "Modelfile"

    @property
    def base_gguf(self) -> Path:
        """The base model (not fine-tuned) as F16, which the LoRA GGUF applies to."""
        return self.gguf_dir / "base-F16.gguf"

    @property
    def lora_gguf(self) -> Path:
        """The LoRA adapter as a GGUF (``export.lora``)."""
        return self.gguf_dir / "adapter-F16.gguf"

    @property
    def imatrix(self) -> Path:
        """The importance matrix of the ``-imat`` variants (llama.cpp's GGUF imatrix format)."""
        return self.gguf_dir / "imatrix.gguf"

    # -- evaluate
    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def scorecard_plot(self) -> Path:
        return self.root / "scorecard.png"

    @property
    def time_estimate(self) -> Path:
        return self.root / "time_estimate.json"

    def relative(self, path: Path) -> str:
        """``path`` as written into the run's own records: relative to the run folder."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
