"""Shared fixtures: tiny models only, no network.

The untrained test variant of the tiny model (2 layers, no pre-training) is built once into the
normal cache and reused; runs that several tests read are made once per session.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Nothing in the tests may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# Small, fast and untrained: enough to test mechanics, not quality.
TEST_OVERRIDES = [
    "tiny.num_layers=2",
    "tiny.pretrain_steps=0",
    "train.max_steps=6",
    "train.batch_tokens=256",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.learning_rate=0.005",
    "data.max_seq_len=128",
    "merge.check_samples=4",
]


def make_config(*extra: str):
    from qlora_pipeline.config import load_config

    return load_config("tiny", TEST_OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def test_config():
    return make_config()


@pytest.fixture(scope="session")
def tiny_base(test_config) -> Path:
    from qlora_pipeline.model import resolve_base

    return Path(resolve_base(test_config, log_fn=lambda *a: None))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from qlora_pipeline.model import load_tokenizer

    return load_tokenizer(str(tiny_base))


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, test_config) -> Path:
    """A run folder with data prepared (read-only for tests: copy it to change it)."""
    from qlora_pipeline.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("prepared")
    run_pipeline(test_config, run_dir, log=lambda *a: None, until="prepare")
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, test_config, tiny_base) -> Path:
    """A run with every stage done on the untrained test variant."""
    from qlora_pipeline.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("trained")
    run_pipeline(test_config, run_dir, log=lambda *a: None)
    return run_dir


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
