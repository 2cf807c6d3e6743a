"""Shared fixtures: tiny models only, no network.

The untrained test variant of the tiny model (2 layers, no pre-training) is built once into the
normal cache and reused; runs that several tests read are made once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
    "prefer.max_steps=4",
    "prefer.batch_size=2",
    "prefer.eval_every=2",
    "prefer.checkpoint_every=2",
    "prefer.eval_max_pairs=6",
    "merge.check_samples=4",
    "export.quant_types=[Q8_0,Q4_K_M]",
    "eval.speed_runs=1",
    "eval.speed_new_tokens=8",
    "eval.samples=1",
    "eval.kld_max_tokens=600",
    "eval.parity_tokens=300",
]


def shared_run(tmp_path_factory, name: str, build) -> Path:
    """A run folder that several tests read, made once per session by ``build(folder)``.

    With QLORA_TEST_RUN_CACHE set (``make mutation`` sets it), it is made once into that folder and
    reused by later sessions: each mutant's pytest session then skips minutes of training. The
    runs are built by unmutated code, so a mutant must be caught by the tests that call it directly.
    """
    cache = os.environ.get("QLORA_TEST_RUN_CACHE")
    if not cache:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    done = Path(cache) / name
    if not done.is_dir():
        partial = Path(tmp_path_factory.mktemp(f"{name}-partial"))
        build(partial)
        done.parent.mkdir(parents=True, exist_ok=True)
        staged = done.with_name(f".{name}.{os.getpid()}")
        shutil.move(str(partial), str(staged))  # maybe across file systems: staged beside, then renamed
        os.replace(staged, done)
    return done


def make_config(*extra: str):
    from qlora_pipeline.config import load_config

    return load_config("tiny", TEST_OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def test_config():
    return make_config()


@pytest.fixture(scope="session")
def tiny_base(test_config) -> Path:
    from qlora_pipeline.base import resolve_base

    return Path(resolve_base(test_config, log=lambda *a: None))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from qlora_pipeline.model import load_tokenizer

    return load_tokenizer(str(tiny_base))


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, test_config) -> Path:
    """A run folder with data prepared (read-only for tests: copy it to change it)."""
    from qlora_pipeline.pipeline import run_pipeline

    return shared_run(
        tmp_path_factory,
        "prepared",
        lambda run_dir: run_pipeline(test_config, run_dir, log=lambda *a: None, until="prepare"),
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, test_config, tiny_base) -> Path:
    """A run with every stage done on the untrained test variant."""
    from qlora_pipeline.pipeline import run_pipeline

    return shared_run(
        tmp_path_factory, "trained", lambda run_dir: run_pipeline(test_config, run_dir, log=lambda *a: None)
    )


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="session")
def memorized_run(tmp_path_factory) -> Path:
    """A model that has learned one answer ("Hello there.") and to end it with <|end|>."""
    return shared_run(tmp_path_factory, "memorized", make_memorized_run) / "run"


def make_memorized_run(root: Path) -> None:
    import json

    from qlora_pipeline.pipeline import run_pipeline

    rows = []
    for i in range(40):
        rows.append(
            {
                "message_id": f"q{i}",
                "parent_id": None,
                "message_tree_id": f"q{i}",
                "role": "prompter",
                "text": f"Say hello number {i}",
                "lang": "en",
                "rank": None,
                "deleted": False,
                "review_result": True,
            }
        )
        rows.append(
            {
                "message_id": f"a{i}",
                "parent_id": f"q{i}",
                "message_tree_id": f"q{i}",
                "role": "assistant",
                "text": "Hello there.",
                "lang": "en",
                "rank": 0,
                "deleted": False,
                "review_result": True,
            }
        )
    data = root / "hello.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(
        "data.source=files",
        f"data.data_files=[{data}]",
        "train.max_steps=40",
        "train.learning_rate=0.01",
        "train.eval_every=40",
        "train.checkpoint_every=40",
        "export.quant_types=[Q8_0]",
        "prefer.enabled=false",  # no ranked siblings: nothing to prefer
    )
    run_pipeline(cfg, root / "run", log=lambda *a: None, until="export")


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(megabytes, readonly=False)`` mounts a small tmpfs at a fresh folder and returns it;
    unmounted after the test. A real full (or read-only) disk; needs root, skipped elsewhere."""
    mounted = []

    def mount(megabytes: int, readonly: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={megabytes}m" + (",ro" if readonly else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}); needs root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def pytest_collection_modifyitems(config, items):
    """Under ``make mutation`` (QLORA_MUTATION_STATS set): the fastest tests first, from the durations
    mutmut recorded, so that a mutant stops at the quickest test that notices it (mutmut runs -x).
    With QLORA_MUTATION_MAX_SECONDS, tests slower than that are left out of this pass; bench/mutation.py
    runs every survivor of it again with all its tests, so no verdict rests on the shortcut."""
    stats = os.environ.get("QLORA_MUTATION_STATS")
    if not stats or not Path(stats).is_file():
        return
    import json

    durations = json.loads(Path(stats).read_text(encoding="utf-8")).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return  # mutmut listing the tests or recording which test calls what: every test counts
    cap = float(os.environ.get("QLORA_MUTATION_MAX_SECONDS") or "inf")
    slow = [item for item in items if durations.get(item.nodeid, 0.0) > cap]
    if slow and len(slow) < len(items):
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


def pytest_configure(config):
    """mutmut's instrumented run (MUTANT_UNDER_TEST=stats) counts the calls in this process; a test's
    subprocess (the Space, a training rank) that inherited it would look for mutmut's settings in its
    own folder and fail. mutmut keeps the value in-process too, so this process still counts."""
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        del os.environ["MUTANT_UNDER_TEST"]
