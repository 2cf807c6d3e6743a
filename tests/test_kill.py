"""Interruption: training killed at random moments resumes to the very adapter of an uninterrupted run.

Every run here is a real ``qlora-pipeline run --until train`` process. A killed run (SIGKILL:
no handler, no clean-up) is continued with ``run --resume``; after the last resume the adapter,
the training log and the summary must equal those of the reference run, which needs the data
order, RNG states, optimizer, scheduler, accumulation position and early-stopping state all
restored. The moments are drawn from seeds: inside a step (between the micro-batches of one
accumulated step, too), inside an evaluation, inside a checkpoint write, and at a random time.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_OVERRIDES
from safetensors.torch import load_file

from qlora_pipeline.checkpoints import checkpoint_is_complete
from qlora_pipeline.layout import RunLayout

OVERRIDES = TEST_OVERRIDES + [
    "train.max_steps=8",
    "train.gradient_accumulation_steps=2",
    "train.checkpoint_every=2",
    "train.eval_every=3",
    "train.eval_max_batches=2",
    "train.early_stopping_patience=2",
    "train.keep_checkpoints=2",
    "lora.dropout=0.1",  # dropout: the RNG state matters
]
HARNESS = REPO / "tests" / "helpers" / "kill_harness.py"
KILLED = -signal.SIGKILL


def run_args(run: Path, resume: bool) -> list[str]:
    """The command line: a new run with the test settings, or ``run --resume`` of an existing one."""
    return [
        "run",
        "--run-dir",
        str(run),
        "--until",
        "train",
        *(["--resume"] if resume else ["--preset", "tiny", *OVERRIDES]),
    ]


def harness(run: Path, kind: str = "none", n: int = 0, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HARNESS), kind, str(n), *run_args(run, resume)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def finish(run: Path) -> None:
    result = harness(run, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]


def check_checkpoints_complete_or_invisible(run: Path) -> None:
    for path in RunLayout(run).checkpoints.glob("step-*"):
        assert checkpoint_is_complete(path), f"{path} is visible but incomplete"


def outcome(run: Path) -> tuple[dict, list, dict]:
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    log = [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # timing varies
        for line in (run / "train_log.jsonl").read_text().splitlines()
    ]
    summary = json.loads((run / "adapter" / "training_summary.json").read_text())
    keys = ("steps", "stopped_early", "best_step", "best_val_loss", "final_val_loss", "tokens_seen")
    return tensors, log, {k: summary[k] for k in keys}


def assert_same_outcome(run: Path, reference: tuple) -> None:
    tensors, log, summary = outcome(run)
    ref_tensors, ref_log, ref_summary = reference
    assert tensors.keys() == ref_tensors.keys()
    for name in tensors:  # exactly: on the CPU every step is deterministic
        assert torch.equal(tensors[name], ref_tensors[name]), name
    assert log == ref_log
    assert summary == ref_summary
    assert not [p.name for p in RunLayout(run).checkpoints.iterdir() if p.name.startswith(".")], "leftover temp folders"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple:
    run = tmp_path_factory.mktemp("kill") / "reference"
    result = harness(run)
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(run)


# Kill chains: each (kind, n) kills one process; the next process resumes, until the last resume
# finishes. The n are drawn per seed from ranges every process is sure to reach.
def kill_chain(seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    chain = [("step", rng.randint(3, 10)), ("eval", rng.randint(1, 3)), ("checkpoint", rng.randint(1, 4))]
    rng.shuffle(chain)
    return chain


# Seeds 0 and 3 draw step 9 and step 6 (the first micro-batch of a step, and the second one:
# gradients of the first already accumulated) and checkpoint 1 and 2 (after its loop_state.json;
# after its manifest, just before the rename): every kind of moment at least once.
KILL_SEEDS = [0, 3]


def test_the_drawn_moments_cover_every_kind():
    drawn = [kill for seed in KILL_SEEDS for kill in kill_chain(seed)]
    assert {n % 2 for kind, n in drawn if kind == "step"} == {0, 1}
    assert {n for kind, n in drawn if kind == "checkpoint"} >= {1, 2}
    assert any(kind == "eval" for kind, _ in drawn)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_drawn_moments_then_resume_equals_uninterrupted(reference, tmp_path, seed):
    run = tmp_path / "run"
    for i, (kind, n) in enumerate(kill_chain(seed)):
        result = harness(run, kind, n, resume=i > 0)
        assert result.returncode == KILLED, f"{kind} #{n} did not kill the run: {result.stderr[-2000:]}"
        check_checkpoints_complete_or_invisible(run)
        assert not (run / "adapter").exists()
    finish(run)
    assert_same_outcome(run, reference)


def _kill_when(process: subprocess.Popen, run: Path, log_lines: int, delay: float, sig: int) -> None:
    """Send ``sig`` ``delay`` seconds after the training log holds ``log_lines`` lines."""
    log = run / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= log_lines:
            time.sleep(delay)
            process.send_signal(sig)
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended before its log reached {log_lines} lines")


@pytest.mark.parametrize("seed", [0, 1])
def test_signal_at_a_random_time_then_resume_equals_uninterrupted(reference, tmp_path, seed):
    """SIGKILL at a random moment, then SIGTERM or SIGINT (saves a checkpoint, exits 130 with the
    resume command), then resume to the end."""
    rng = random.Random(seed)
    run = tmp_path / "run"
    for i, sig in enumerate((signal.SIGKILL, rng.choice([signal.SIGTERM, signal.SIGINT]))):
        process = subprocess.Popen(
            [sys.executable, "-m", "qlora_pipeline.cli", *run_args(run, resume=i > 0)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = len((run / "train_log.jsonl").read_text().splitlines()) if i else 0
        _kill_when(process, run, lines + rng.randint(1, 4), rng.uniform(0, 0.3), sig)
        stdout, stderr = process.communicate(timeout=300)
        check_checkpoints_complete_or_invisible(run)
        if sig == signal.SIGKILL:
            assert process.returncode == KILLED
        else:
            assert process.returncode == 130, stderr[-2000:]
            assert f"resume with: qlora-pipeline run --run-dir {run} --resume" in stdout
    finish(run)
    assert_same_outcome(run, reference)
