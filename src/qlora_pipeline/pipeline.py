"""Running stages in order, skipping the ones whose outputs are complete and up to date.

    from qlora_pipeline.pipeline import run_pipeline
    run_pipeline(cfg, Path("runs/demo"))

Each finished stage leaves ``RUN/stages/<stage>.json`` with a hash of the configuration
sections it depends on. A stage is skipped when that record matches and its outputs exist;
a changed setting re-runs the stage that reads it and every stage after it, and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qlora_pipeline.config import PipelineConfig, config_from_dict
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.paths import write_json_atomic


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections whose change invalidates this stage
    outputs: tuple[str, ...]  # paths under RUN that must exist when it is done


STAGES = (
    Stage("prepare", ("data",), ("data/train.jsonl", "data/val.jsonl", "data/test.jsonl", "data/stats.json")),
    Stage("train", ("data", "tiny", "model", "lora", "train"), ("adapter/adapter_config.json",)),
    Stage("merge", ("data", "tiny", "model", "lora", "train", "merge"), ("merged/config.json", "merge_check.json")),
    Stage("export", ("data", "tiny", "model", "lora", "train", "merge", "export"), ("gguf/manifest.json",)),
    Stage("evaluate", ("data", "tiny", "model", "lora", "train", "merge", "export", "eval"),
          ("report.json", "scorecard.png")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def check_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"run directory {run_dir} is a file; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except PermissionError:
        raise PipelineError(f"run directory {run_dir} is not writable; choose another --run-dir "
                            "or fix its permissions") from None
    return run_dir


def save_run_config(cfg: PipelineConfig, run_dir: Path) -> None:
    write_json_atomic(Path(run_dir) / "config.json", cfg.to_dict())


def read_run_config(run_dir: Path) -> PipelineConfig | None:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    return config_from_dict(json.loads(path.read_text()))


def _record_path(run_dir: Path, stage: Stage) -> Path:
    return Path(run_dir) / "stages" / f"{stage.name}.json"


def stage_status(cfg: PipelineConfig, run_dir: Path, stage: Stage) -> str:
    """``done`` (skip), ``missing`` (never finished) or ``changed`` (config differs)."""
    record = _record_path(run_dir, stage)
    if not record.is_file() or not all((Path(run_dir) / out).exists() for out in stage.outputs):
        return "missing"
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return "missing"
    return "done" if saved.get("config_hash") == cfg.section_hash(*stage.sections) else "changed"


def mark_done(cfg: PipelineConfig, run_dir: Path, stage: Stage, seconds: float) -> None:
    write_json_atomic(_record_path(run_dir, stage), {
        "config_hash": cfg.section_hash(*stage.sections), "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def stage_functions() -> dict[str, Callable]:
    from qlora_pipeline.data import prepare
    from qlora_pipeline.evaluate import evaluate
    from qlora_pipeline.export import export
    from qlora_pipeline.merge import merge
    from qlora_pipeline.train import train

    return {
        "prepare": lambda cfg, run_dir, log, resume: prepare(cfg.data, run_dir),
        "train": lambda cfg, run_dir, log, resume: train(cfg, run_dir, resume=resume, log=log),
        "merge": lambda cfg, run_dir, log, resume: merge(cfg, run_dir, log=log),
        "export": lambda cfg, run_dir, log, resume: export(cfg, run_dir, log=log),
        "evaluate": lambda cfg, run_dir, log, resume: evaluate(cfg, run_dir, log=log),
    }


def run_stage(name: str, cfg: PipelineConfig, run_dir: Path, log=print, resume: bool = False):
    stage = next(s for s in STAGES if s.name == name)
    # This stage's outputs are about to change: neither it nor any later stage counts as done
    # until it finishes again, even if this run is interrupted.
    for later in STAGES[STAGE_NAMES.index(name):]:
        _record_path(run_dir, later).unlink(missing_ok=True)
    started = time.time()
    result = stage_functions()[name](cfg, run_dir, log, resume)
    if isinstance(result, dict) and result.get("interrupted"):
        return result
    mark_done(cfg, run_dir, stage, time.time() - started)
    return result


def run_pipeline(cfg: PipelineConfig, run_dir: Path, log=print, resume: bool = False,
                 force: tuple[str, ...] = (), until: str | None = None) -> dict:
    """Run every stage (up to ``until``), skipping completed ones; return per-stage seconds."""
    run_dir = check_run_dir(run_dir)
    save_run_config(cfg, run_dir)
    timings: dict[str, float] = {}
    rerun_rest = False
    for stage in STAGES:
        status = stage_status(cfg, run_dir, stage)
        if status == "done" and not rerun_rest and stage.name not in force:
            log(f"[{stage.name}] already done with this configuration; skipping")
            timings[stage.name] = 0.0
        else:
            if status == "changed":
                log(f"[{stage.name}] configuration changed since the last run; running it again")
            elif stage.name in force:
                log(f"[{stage.name}] forced to run again")
            log(f"[{stage.name}] running")
            started = time.time()
            resume_this = resume and stage.name == "train" and status != "done"
            result = run_stage(stage.name, cfg, run_dir, log=log, resume=resume_this)
            timings[stage.name] = round(time.time() - started, 1)
            rerun_rest = True
            if isinstance(result, dict) and result.get("interrupted"):
                return {"interrupted": True, "timings": timings}
        if until == stage.name:
            break
    return {"timings": timings}
