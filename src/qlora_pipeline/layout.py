"""Every path of a run folder, named once.

    RUN/
      config.json            the run's configuration (pipeline.save_run_config)
      stages/<stage>.json    what each finished stage was run with (pipeline)
      data/{train,val,test}.jsonl, data/stats.json          prepare
      data/pairs-{train,val,test}.jsonl                      prepare (preference pairs)
      checkpoints/step-NNNNNN/, train_log.jsonl, loss.png    train
      adapter/               the LoRA adapter and training_summary.json           train
      adapter-dpo/, checkpoints-dpo/, prefer_log.jsonl, preference.png        prefer (DPO)
      merged/, merge_check.json                              merge
      gguf/model-<TYPE>.gguf, gguf/manifest.json             export
      report.json, report.md, scorecard.png                  evaluate
      time_estimate.json     the notebooks' time estimates (timing)
      large_files.json       where merged/ and gguf/ live when not here (``place_large_files``)

The large parts (``LARGE_PARTS``: the merged model and the GGUFs, 20+ GB at full size) may live
in another folder than the rest: on Colab the run folder is on Google Drive (15 GB free), which
keeps what is small and precious (data, checkpoints, adapter, records, reports), while the large
parts go to the VM's own disk and the Hub. ``large_files.json`` names that folder; every path
below goes through it, and ``resolve`` maps a run-relative name (``merged/config.json``) there.

Paths written into ``report.json`` are relative to the run folder (``RunLayout.relative``), so a
run folder can be moved or copied whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
LARGE_PARTS = ("merged", "gguf")  # the folders that may live outside the run folder
LARGE_FILES_POINTER = "large_files.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    follow_pointer: bool = True  # False: the names alone, relative to ``root`` (``NAMES``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- where the large parts live
    @property
    def large_root(self) -> Path:
        """The folder holding ``merged/`` and ``gguf/``: the run folder unless ``large_files.json``
        names another (read on every use: a notebook may set it after the layout was made)."""
        if not self.follow_pointer:
            return self.root
        try:
            return Path(json.loads((self.root / LARGE_FILES_POINTER).read_text(encoding="utf-8"))["folder"])
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            return self.root

    def resolve(self, name: str) -> Path:
        """A run-relative name (``merged/config.json``, ``report.json``) as the path it has on disk."""
        first = name.split("/", 1)[0]
        return (self.large_root if first in LARGE_PARTS else self.root) / name

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

    def pairs(self, name: str) -> Path:
        """Preference pairs of one split (TRL's conversational format)."""
        return self.data / f"pairs-{name}.jsonl"

    @property
    def data_stats(self) -> Path:
        """What every filter dropped, and the split sizes."""
        return self.data / "stats.json"

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

    # -- prefer (DPO on the SFT adapter)
    @property
    def adapter_dpo(self) -> Path:
        """The preference-tuned adapter and preference.json (its measurements)."""
        return self.root / "adapter-dpo"

    @property
    def prefer_checkpoints(self) -> Path:
        """TRL's own checkpoints of the DPO run (``checkpoint-N/``), for resuming."""
        return self.root / "checkpoints-dpo"

    @property
    def prefer_log(self) -> Path:
        return self.root / "prefer_log.jsonl"

    @property
    def preference_plot(self) -> Path:
        return self.root / "preference.png"

    @property
    def has_dpo_adapter(self) -> bool:
        """Whether the ``prefer`` stage has left its adapter (what the Hub push carries along)."""
        return (self.adapter_dpo / "adapter_config.json").is_file()

    def adapter_for(self, prefer_enabled: bool) -> Path:
        """The adapter merge, export and evaluate take under a configuration: the DPO one when
        ``prefer.enabled`` (an error when the prefer stage has not left it), else the SFT one (a
        DPO adapter left from another configuration is not used)."""
        if not prefer_enabled:
            return self.adapter
        if not self.has_dpo_adapter:
            from qlora_pipeline.errors import StageOrderError

            raise StageOrderError(
                f"{self.adapter_dpo} is missing and prefer.enabled is on; run `qlora-pipeline prefer "
                f"--run-dir {self.root}` first, or set prefer.enabled=false"
            )
        return self.adapter_dpo

    # -- merge
    @property
    def merged(self) -> Path:
        return self.resolve("merged")

    @property
    def merge_check(self) -> Path:
        return self.root / "merge_check.json"

    # -- export
    @property
    def gguf_dir(self) -> Path:
        return self.resolve("gguf")

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
        """``path`` as written into the run's own records: relative to the run folder (or, for the
        large parts, to the folder that holds them: the same name either way)."""
        path = Path(path).resolve()
        large = self.large_root.resolve()
        if large != self.root.resolve() and path.is_relative_to(large):
            return path.relative_to(large).as_posix()
        return path.relative_to(self.root.resolve()).as_posix()


def place_large_files(run_dir: Path, folder: Path | None) -> None:
    """Keep ``run_dir``'s merged model and GGUFs in ``folder`` (None: back in the run folder)."""
    from qlora_pipeline.paths import write_json_atomic

    pointer = Path(run_dir) / LARGE_FILES_POINTER
    if folder is None:
        pointer.unlink(missing_ok=True)
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(pointer, {"folder": str(Path(folder).resolve())})


NAMES = RunLayout(Path(), follow_pointer=False)  # every path as a name relative to the run folder


def names(*paths: Path) -> tuple[str, ...]:
    """``NAMES`` paths as the run-relative strings the stage records use (``merged/config.json``)."""
    return tuple(Path(p).as_posix() for p in paths)
