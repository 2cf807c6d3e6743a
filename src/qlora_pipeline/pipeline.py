"""Running stages in order, skipping the ones whose outputs are complete and up to date.

    from qlora_pipeline.pipeline import run_pipeline
    run_pipeline(cfg, Path("runs/demo"))

Each finished stage leaves ``RUN/stages/<stage>.json``: a hash per configuration section it
depends on, a digest of its inputs (the recorded outputs of the stages before it) and a
manifest of its own outputs (size and sha256 of every file). A stage is skipped only when all
three still match; otherwise it runs again and the log says why (which section, which input,
which file). A stage that reproduces the same files leaves the stages after it skipped.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.config import TRAINING_SECTIONS, PipelineConfig, config_from_dict
from qlora_pipeline.errors import PipelineError, StageOrderError
from qlora_pipeline.layout import NAMES, SPLITS, RunLayout, names
from qlora_pipeline.paths import file_manifest, manifest_difference, write_json_atomic


@dataclass(frozen=True)
class Stage:
    """One stage: its module (which exposes ``run(cfg, run_dir, *, log, resume=False)``), the
    stages whose outputs it reads, and what decides whether it is done."""

    name: str
    module: str  # qlora_pipeline.<module>, whose run() is the stage
    after: tuple[str, ...]  # stages whose required files it reads: checked before it runs
    sections: tuple[str, ...]  # config sections whose change invalidates this stage
    outputs: tuple[str, ...]  # files and folders under RUN it writes (its manifest covers them)
    required: tuple[str, ...]  # files under RUN that must exist when it is done

    def run(self, cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool | None = None):
        """``resume`` None: the stage's own default (train starts over, prefer continues)."""
        # imported when run: the stage modules bring torch, transformers and llama.cpp with them
        stage_run = importlib.import_module(f"qlora_pipeline.{self.module}").run
        return stage_run(cfg, run_dir, log=log, **({} if resume is None else {"resume": resume}))


STAGES = (
    Stage(
        "prepare",
        "prepare",
        (),
        ("data",),
        names(NAMES.data),
        names(*(NAMES.split(n) for n in SPLITS), *(NAMES.pairs(n) for n in SPLITS), NAMES.data_stats),
    ),
    Stage(
        "train",
        "train",
        ("prepare",),
        TRAINING_SECTIONS,
        names(NAMES.adapter, NAMES.train_log, NAMES.loss_plot),
        names(NAMES.adapter / "adapter_config.json"),
    ),
    Stage(
        "prefer",
        "prefer",
        ("prepare", "train"),
        (*TRAINING_SECTIONS, "prefer"),
        names(NAMES.adapter_dpo, NAMES.prefer_log, NAMES.preference_plot),
        (),  # nothing when prefer.enabled is off; merge takes RunLayout.adapter_for(enabled)
    ),
    Stage(
        "merge",
        "merge",
        ("train",),
        (*TRAINING_SECTIONS, "prefer", "merge"),
        names(NAMES.merged, NAMES.merge_check),
        names(NAMES.merged / "config.json", NAMES.merge_check),
    ),
    Stage(
        "export",
        "export",
        ("merge",),
        (*TRAINING_SECTIONS, "prefer", "merge", "export"),
        names(NAMES.gguf_dir),
        names(NAMES.gguf_manifest),
    ),
    Stage(
        "evaluate",
        "evaluate",
        ("prepare", "train", "merge", "export"),
        (*TRAINING_SECTIONS, "prefer", "merge", "export", "eval"),
        names(NAMES.report_json, NAMES.report_md, NAMES.scorecard_plot),
        names(NAMES.report_json, NAMES.scorecard_plot),
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def check_prerequisites(stage: Stage, run_dir: Path) -> None:
    """Refuse to start ``stage`` before the stages it reads have left their files."""
    layout = RunLayout(run_dir)
    for earlier in stage.after:
        for needed in STAGE_BY_NAME[earlier].required:
            if not layout.resolve(needed).is_file():
                raise StageOrderError(
                    f"{layout.resolve(needed)} is missing; run `qlora-pipeline {earlier} --run-dir {run_dir}` first"
                )


def check_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"run directory {run_dir} is a file; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:  # permissions, a read-only file system, a file in the way
        raise PipelineError(
            f"run directory {run_dir} is not writable ({exc.strerror}); choose another --run-dir or fix its permissions"
        ) from None
    return run_dir


def save_run_config(cfg: PipelineConfig, run_dir: Path) -> None:
    write_json_atomic(RunLayout(run_dir).config, cfg.to_dict())


def read_run_config(run_dir: Path) -> PipelineConfig | None:
    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    return config_from_dict(json.loads(path.read_text()))


def _record_path(run_dir: Path, stage: Stage) -> Path:
    return RunLayout(run_dir).stage_record(stage.name)


def _read_record(run_dir: Path, stage: Stage) -> dict | None:
    try:
        record = json.loads(_record_path(run_dir, stage).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "outputs" in record else None


def _section_hashes(cfg: PipelineConfig, stage: Stage) -> dict[str, str]:
    return {name: cfg.section_hash(name) for name in stage.sections}


def _inputs_digest(run_dir: Path, stage: Stage) -> str:
    """The recorded outputs of every earlier stage: what this stage read."""
    digest = hashlib.sha256()
    for earlier in STAGES[: STAGE_NAMES.index(stage.name)]:
        record = _read_record(run_dir, earlier) or {}
        outputs = record.get("outputs", {})
        digest.update(json.dumps({k: v["sha256"] for k, v in sorted(outputs.items())}).encode())
    return digest.hexdigest()[:16]


def stage_status(cfg: PipelineConfig, run_dir: Path, stage: Stage) -> tuple[str, str]:
    """``("done", "")`` to skip, else a state and the reason to run again: ``missing`` (never
    finished), ``changed`` (config), ``inputs`` (an earlier stage's outputs) or ``outputs``."""
    record = _read_record(run_dir, stage)
    run_dir = Path(run_dir)
    if record is None:
        return "missing", "not done yet"
    changed = [
        name for name, value in _section_hashes(cfg, stage).items() if record.get("config", {}).get(name) != value
    ]
    if changed:
        return "changed", f"configuration changed since the last run ({', '.join(changed)})"
    if record.get("inputs") != _inputs_digest(run_dir, stage):
        return "inputs", "its inputs changed (an earlier stage wrote different files)"
    layout = RunLayout(run_dir)
    missing = [name for name in stage.required if not layout.resolve(name).is_file()]
    current = file_manifest(run_dir, stage.outputs, previous=record["outputs"], locate=layout.resolve)
    different = missing[0] if missing else manifest_difference(record["outputs"], current)
    if different:
        return "outputs", f"its output {different} is missing or was changed since it finished"
    return "done", ""


def mark_done(cfg: PipelineConfig, run_dir: Path, stage: Stage, seconds: float) -> None:
    write_json_atomic(
        _record_path(run_dir, stage),
        {
            "config": _section_hashes(cfg, stage),
            "inputs": _inputs_digest(run_dir, stage),
            "outputs": file_manifest(Path(run_dir), stage.outputs, locate=RunLayout(run_dir).resolve),
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def run_stage(name: str, cfg: PipelineConfig, run_dir: Path, log=print, resume: bool | None = None):
    stage = STAGE_BY_NAME[name]
    check_prerequisites(stage, run_dir)
    # This stage's outputs are about to change: it does not count as done until it finishes
    # again, even if this run is interrupted (the stages after it see their inputs change).
    _record_path(run_dir, stage).unlink(missing_ok=True)
    if name == "train":  # a DPO adapter made from the adapter about to be replaced must not outlive it
        from qlora_pipeline.prefer import remove_outputs

        # its checkpoints stay: a notebook re-run after a disconnect finishes train again with the
        # same adapter, and DPO then continues where it stopped (prefer.fingerprint decides)
        remove_outputs(RunLayout(run_dir), keep_checkpoints=True)
    started = time.time()
    result = stage.run(cfg, run_dir, log=log, resume=resume)
    if isinstance(result, dict) and result.get("interrupted"):
        return result
    mark_done(cfg, run_dir, stage, time.time() - started)
    return result


def _train_resume(cfg: PipelineConfig, run_dir: Path, resume: bool, forced: bool, log) -> bool:
    """Whether ``run`` resumes training: with --resume when a checkpoint of this configuration
    exists (else it starts from step 0 and says so). Without --resume, an interrupted run's
    checkpoint is not thrown away silently: the user picks --resume or --force train."""
    from qlora_pipeline.checkpoints import checkpoint_finished, find_resumable, training_fingerprint

    if forced:
        return False
    checkpoint = find_resumable(run_dir, training_fingerprint(cfg, run_dir), log=log, required=False)
    if resume and checkpoint is None:
        log("[train] no checkpoint of this configuration to resume from; training starts at step 0")
    if not resume and checkpoint is not None and not checkpoint_finished(checkpoint):
        raise PipelineError(
            f"training was interrupted and {checkpoint} can continue it; add --resume to "
            "continue, or --force train to start over"
        )
    return resume and checkpoint is not None


def _stage_resume(name: str, cfg: PipelineConfig, run_dir: Path, resume: bool, forced: bool, log) -> bool | None:
    """What ``run`` tells a stage about resuming: train continues only with --resume; prefer
    continues from its own checkpoints unless forced; the others have nothing to resume."""
    if name == "train":
        return _train_resume(cfg, run_dir, resume, forced, log)
    if name == "prefer":
        return not forced
    return None


def continue_run(run_dir: Path, parts: dict[str, str | None], log=print) -> PipelineConfig:
    """Notebooks 2 and 3 on a fresh VM: pull each part ({"adapter": repo, ...}) RUN_DIR lacks from
    the Hub repo named for it, read the run's configuration, and prepare the data splits again
    (deterministic from that configuration) if RUN_DIR has none. A merged model that is neither
    here (it is not kept on Drive) nor on the Hub is merged again from the base and the adapter."""
    from qlora_pipeline.hub import pull_run_part

    layout = RunLayout(run_dir)
    for part, repo in parts.items():
        if part == "merged" and not repo and not layout.merged.is_dir() and layout.adapter.is_dir():
            continue  # merged again below, once the configuration is read
        pull_run_part(run_dir, part, repo, log=log)
    cfg = read_run_config(run_dir)
    if cfg is None:
        raise PipelineError(f"{run_dir} has no config.json: run S29_finetuning_llm.ipynb with this RUN_DIR first")
    if not all(layout.resolve(name).is_file() for name in STAGE_BY_NAME["prepare"].required):
        run_stage("prepare", cfg, run_dir, log=log)  # (a run from before the pairs existed gets them too)
    if "merged" in parts and not (layout.merged / "config.json").is_file():
        log("[merge] no merged model here or on the Hub (MERGED_REPO): merging the adapter into the base again")
        run_stage("merge", cfg, run_dir, log=log)
    return cfg


def resume_training(cfg: PipelineConfig, run_dir: Path, fresh: bool = False, log=print) -> bool:
    """For a notebook: whether its train step continues from ``run_dir``'s newest checkpoint of
    this configuration (a Colab VM that disconnected mid-training), unless ``fresh``."""
    from qlora_pipeline.checkpoints import find_resumable, training_fingerprint

    if fresh:
        log("[train] starting from step 0 (START_FRESH); older checkpoints are replaced")
        return False
    checkpoint = find_resumable(run_dir, training_fingerprint(cfg, run_dir), log=log, required=False)
    if checkpoint is not None:
        log(f"[train] continuing from {checkpoint} (set START_FRESH = True to start over)")
    return checkpoint is not None


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: Path,
    log=print,
    resume: bool = False,
    force: tuple[str, ...] = (),
    until: str | None = None,
) -> dict:
    """Run every stage (up to ``until``), skipping completed ones; return per-stage seconds."""
    run_dir = check_run_dir(run_dir)
    save_run_config(cfg, run_dir)
    timings: dict[str, float] = {}
    for stage in STAGES:
        status, reason = stage_status(cfg, run_dir, stage)
        if status == "done" and stage.name not in force:
            log(f"[{stage.name}] already done with this configuration; skipping")
            timings[stage.name] = 0.0
        else:
            if stage.name in force:
                log(f"[{stage.name}] forced to run again")
            elif status != "missing":
                log(f"[{stage.name}] {reason}; running it again")
            log(f"[{stage.name}] running")
            resume_this = _stage_resume(stage.name, cfg, run_dir, resume, stage.name in force, log)
            started = time.time()
            result = run_stage(stage.name, cfg, run_dir, log=log, resume=resume_this)
            timings[stage.name] = round(time.time() - started, 1)
            if isinstance(result, dict) and result.get("interrupted"):
                return {"interrupted": True, "timings": timings}
        if until == stage.name:
            break
    return {"timings": timings}
