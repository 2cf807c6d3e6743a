"""The bad-input table: every case is one command a user could type, with something wrong in it.

Each must end with one line ``error: ...`` naming the file or value and the fix (no traceback),
exit status 2, and nothing at the output path the command would have written. The commands run
in this process through ``cli.main`` (the same code as the console script; test_cli.py runs it
as a real process), which keeps thirty-odd cases to seconds each.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES, copy_run

from qlora_pipeline.cli import main


def row(mid, text="hello", parent=None, role=None, tree=None, **extra) -> dict:
    role = role or ("prompter" if parent is None else "assistant")
    return {
        "message_id": mid,
        "parent_id": parent,
        "message_tree_id": tree or (parent or mid).split("/")[0],
        "role": role,
        "text": text,
        "lang": "en",
        "rank": 0 if parent else None,
        "deleted": False,
        "review_result": True,
        **extra,
    }


GOOD = [row("q"), row("a", parent="q", tree="q")]


@dataclass
class Env:
    """What a case may build on: a scratch folder and (lazily) the shared runs and base model."""

    tmp: Path
    request: pytest.FixtureRequest

    def fixture(self, name: str) -> Path:
        return self.request.getfixturevalue(name)

    def data_file(self, lines: list, name: str = "rows.jsonl") -> Path:
        path = self.tmp / name
        path.write_bytes(
            b"".join(
                (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
                + b"\n"
                for line in lines
            )
        )
        return path

    def prepare(self, lines: list, *overrides: str) -> tuple[list[str], Path]:
        run = self.tmp / "run"
        return ["prepare", "--run-dir", str(run), "--data-files", str(self.data_file(lines)), *overrides], run / "data"

    def run_copy(self, name: str) -> Path:
        return copy_run(self.fixture(name), self.tmp / "run")

    def base_copy(self, damage: Callable[[Path], None]) -> Path:
        base = Path(shutil.copytree(self.fixture("tiny_base"), self.tmp / "base"))
        damage(base)
        return base

    def gguf(self, damage: Callable[[bytes], bytes]) -> Path:
        source = self.fixture("trained_run") / "gguf" / "model-Q8_0.gguf"
        path = self.tmp / "model.gguf"
        path.write_bytes(damage(source.read_bytes()))
        return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def train_on_base(env: Env, damage: Callable[[Path], None]) -> tuple[list[str], Path]:
    base = env.base_copy(damage)
    run = env.run_copy("prepared_run")
    return ["train", "--run-dir", str(run), f"model.name_or_path={base}"], run / "adapter"


def no_chat_template(env: Env) -> Path:
    """The exported Q8_0 GGUF with its chat template removed by gguf-py's own metadata tool."""
    from qlora_pipeline.gguf.llamacpp import ensure_llama_cpp

    source = env.fixture("trained_run") / "gguf" / "model-Q8_0.gguf"
    out = env.tmp / "no-template.gguf"
    tool = ensure_llama_cpp().root / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    subprocess.run(
        [sys.executable, str(tool), str(source), str(out), "--remove-metadata", "tokenizer.chat_template", "--force"],
        check=True,
        capture_output=True,
    )
    return out


def chat(model: Path, *extra: str) -> list[str]:
    return ["chat", "--model", str(model), "--prompt", "hi", *extra]


def readonly_run_dir(env: Env) -> tuple[list[str], Path]:
    disk = env.fixture("tmpfs")(1, readonly=True)
    return ["prepare", "--run-dir", str(disk / "run")], disk / "run"


def run_dir_is_a_file(env: Env) -> tuple[list[str], Path]:
    (env.tmp / "file").write_text("x")
    return ["prepare", "--run-dir", str(env.tmp / "file")], env.tmp / "file" / "data"


def merge_foreign_adapter(env: Env) -> tuple[list[str], Path]:
    run = env.run_copy("trained_run")
    shutil.rmtree(run / "merged")
    # The adapter was trained on the 2-layer, 768-wide tiny base; this base has a 512-wide FFN.
    return ["merge", "--run-dir", str(run), "tiny.intermediate_size=512"], run / "merged"


def merge_truncated_adapter(env: Env) -> tuple[list[str], Path]:
    run = env.run_copy("trained_run")
    shutil.rmtree(run / "merged")
    truncate(run / "adapter-dpo" / "adapter_model.safetensors")  # the adapter merge takes (prefer is on)
    return ["merge", "--run-dir", str(run)], run / "merged"


def merge_pickle_adapter(env: Env) -> tuple[list[str], Path]:
    import torch
    from safetensors.torch import load_file

    run = env.run_copy("trained_run")
    shutil.rmtree(run / "merged")
    weights = run / "adapter-dpo" / "adapter_model.safetensors"  # the adapter merge takes (prefer is on)
    torch.save(load_file(str(weights)), run / "adapter-dpo" / "adapter_model.bin")
    weights.unlink()
    return ["merge", "--run-dir", str(run)], run / "merged"


SECOND_SHARD = "model-00002-of-00002.safetensors"  # the twin comes in two shards, as Phi-3.5 does


def pickle_base(base: Path) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
        shard.unlink()
    (base / "model.safetensors.index.json").unlink()
    torch.save(tensors, base / "pytorch_model.bin")


def export_unknown_quant(env: Env) -> tuple[list[str], Path]:
    run = env.run_copy("trained_run")
    return ["export", "--run-dir", str(run), "export.quant_types=[Q4_K_M,Q3_X]"], run / "gguf" / "model-Q3_X.gguf"


def resume_without_checkpoint(env: Env) -> tuple[list[str], Path]:
    run = env.run_copy("prepared_run")
    return ["train", "--run-dir", str(run), "--resume"], run / "adapter"


def overlong_everywhere(env: Env) -> tuple[list[str], Path]:
    """Forty trees whose every conversation is longer than the context, whichever split they land in."""
    long_text = "a rather long answer " * 20
    rows = [r for i in range(40) for r in (row(f"q{i}", f"{i} {long_text}"), row(f"a{i}", long_text, parent=f"q{i}"))]
    run = env.tmp / "run"
    return [
        "run",
        "--preset",
        "tiny",
        "--run-dir",
        str(run),
        "--until",
        "train",
        "--data-files",
        str(env.data_file(rows)),
        *TEST_OVERRIDES,
        "data.max_seq_len=16",
    ], run / "adapter"


def new_run(*args: str) -> Callable[[Env], tuple[list[str], Path]]:
    return lambda env: (["run", "--run-dir", str(env.tmp / "run"), *args], env.tmp / "run")


CASES: dict[str, tuple[Callable[[Env], tuple[list[str], Path | None]], str]] = {
    # -- data (prepare)
    "malformed JSONL line": (
        lambda env: env.prepare([GOOD[0], '{"message_id": "x"']),
        "rows.jsonl:2: malformed JSON (Expecting ',' delimiter at column 19)",
    ),
    "row missing a field": (
        lambda env: env.prepare([GOOD[0], {k: v for k, v in GOOD[1].items() if k != "role"}]),
        "rows.jsonl:2: missing required oasst1 field 'role'",
    ),
    "wrong type (rank)": (
        lambda env: env.prepare([GOOD[0], {**GOOD[1], "rank": "best"}]),
        "rows.jsonl:2: field 'rank' is str ('best'), expected int or NoneType",
    ),
    "wrong type (text)": (
        lambda env: env.prepare([{**GOOD[0], "text": 42}, GOOD[1]]),
        "rows.jsonl:1: field 'text' is int (42), expected str",
    ),
    "not an object": (lambda env: env.prepare([GOOD[0], "[1, 2]"]), "rows.jsonl:2: expected a JSON object"),
    "unknown role": (
        lambda env: env.prepare([GOOD[0], {**GOOD[1], "role": "bot"}]),
        "rows.jsonl:2: role 'bot' is not an oasst1 role",
    ),
    "parent cycle": (
        lambda env: env.prepare([*GOOD, row("x", parent="y", tree="q"), row("y", parent="x", tree="q")]),
        "is its own ancestor (a parent_id cycle)",
    ),
    "orphans only": (
        lambda env: env.prepare([row("a", parent="gone"), row("b", parent="gone")]),
        "no conversation is left after filtering: the orphan messages filter removed the most (2)",
    ),
    "everything deleted": (
        lambda env: env.prepare([{**GOOD[0], "deleted": True}, GOOD[1]]),
        "no conversation is left after filtering: the deleted messages filter removed the most",
    ),
    "unknown language code": (
        lambda env: env.prepare(GOOD, "data.languages=[xx]"),
        "the other language trees filter removed the most (1); the data's root "
        "languages are en, data.languages is ['xx']",
    ),
    "malformed language code": (
        lambda env: env.prepare(GOOD, "data.languages=[english]"),
        "data.languages='english' is invalid: use oasst1 language codes",
    ),
    "non-UTF-8 bytes": (
        lambda env: env.prepare([GOOD[0], b'{"text": "caf\xe9"}']),
        "rows.jsonl:2: not valid UTF-8; re-save the file as UTF-8",
    ),
    "empty file": (lambda env: env.prepare([]), "the data source holds no messages"),
    "missing data file": (
        lambda env: (
            ["prepare", "--run-dir", str(env.tmp / "run"), "--data-files", str(env.tmp / "nope.jsonl")],
            env.tmp / "run" / "data",
        ),
        "nope.jsonl does not exist; check --data-files",
    ),
    "data file of unknown type": (
        lambda env: (
            ["prepare", "--run-dir", str(env.tmp / "run"), "--data-files", str(env.data_file([], "rows.csv"))],
            env.tmp / "run" / "data",
        ),
        "has unknown type .csv; use .jsonl, .json or .parquet",
    ),
    "conversations longer than the context everywhere": (
        overlong_everywhere,
        "every train conversation (31) is longer than data.max_seq_len=16 tokens even cut at its first turn; raise it",
    ),
    # -- configuration
    "unknown preset": (new_run("--preset", "nope"), "unknown preset 'nope'; choose one of"),
    "unknown config key": (
        new_run("train.learning_rte=0.1"),
        "unknown config key 'train.learning_rte'; did you mean train.learning_rate?",
    ),
    "negative learning rate": (new_run("train.learning_rate=-0.001"), "train.learning_rate=-0.001 is invalid"),
    "LoRA rank 0": (new_run("lora.r=0"), "lora.r=0 is invalid"),
    "lora_alpha 0": (new_run("lora.alpha=0"), "lora.alpha=0 is invalid"),
    "text where a number goes": (new_run("train.max_steps=many"), "use a whole number"),
    "unknown stage for --force": (new_run("--force", "trian"), "--force trian: unknown stage; use one of"),
    "unknown quant type": (export_unknown_quant, "unknown quantization type Q3_X; llama.cpp knows"),
    # -- models and adapters
    "target modules that match nothing": (
        lambda env: (
            lambda run: (["train", "--run-dir", str(run), "lora.target_modules=[q_proj,v_proj]"], run / "adapter")
        )(env.run_copy("prepared_run")),
        "'q_proj' matches no module in any layer",
    ),
    "adapter for a different base": (merge_foreign_adapter, "does not fit this base model (size mismatch"),
    "truncated adapter safetensors": (
        merge_truncated_adapter,
        "adapter_model.safetensors is not a complete safetensors file",
    ),
    "pickle-only adapter": (
        merge_pickle_adapter,
        "has only a pickle checkpoint (adapter_model.bin); the pipeline loads only safetensors",
    ),
    "pickle-only base model": (lambda env: train_on_base(env, pickle_base), "the pipeline loads only safetensors"),
    "missing tokenizer.model": (
        lambda env: train_on_base(env, lambda b: (b / "tokenizer.model").unlink()),
        "has no tokenizer.model",
    ),
    "truncated base safetensors": (
        lambda env: train_on_base(env, lambda b: truncate(b / SECOND_SHARD)),
        f"{SECOND_SHARD} is not a complete safetensors file",
    ),
    "base folder without config.json": (
        lambda env: train_on_base(env, lambda b: (b / "config.json").unlink()),
        "has no config.json; point model.name_or_path at a saved model folder",
    ),
    "merge before training": (
        lambda env: (["merge", "--run-dir", str(env.tmp / "run")], env.tmp / "run" / "merged"),
        "adapter_config.json is missing; run `qlora-pipeline train --run-dir",
    ),
    # -- GGUF files and chat settings
    "truncated GGUF": (lambda env: (chat(env.gguf(lambda b: b[: len(b) // 3])), None), "llama.cpp could not load"),
    "file that is not GGUF": (
        lambda env: (chat(env.gguf(lambda b: b"PK\x03\x04" + b[4:])), None),
        "is not a GGUF file (it does not start with 'GGUF')",
    ),
    "missing GGUF": (lambda env: (chat(env.tmp / "none.gguf"), None), "none.gguf does not exist"),
    "GGUF with no chat template": (
        lambda env: (chat(no_chat_template(env)), None),
        "the GGUF has no chat template (tokenizer.chat_template)",
    ),
    "temperature out of range": (
        lambda env: (chat(env.tmp / "x.gguf", "--temperature", "-1"), None),
        "temperature=-1.0 is invalid: use 0 to 5",
    ),
    "top-p out of range": (
        lambda env: (chat(env.tmp / "x.gguf", "--top-p", "1.5"), None),
        "top_p=1.5 is invalid: use a value in (0, 1]",
    ),
    "context too small": (
        lambda env: (chat(env.fixture("trained_run") / "gguf" / "model-Q8_0.gguf", "--n-ctx", "8"), None),
        "n_ctx=8 is invalid: use at least 64 tokens",
    ),
    # -- run folders
    "run directory that is a file": (run_dir_is_a_file, "is a file; choose another --run-dir"),
    "read-only run directory": (readonly_run_dir, "is not writable"),
    "--resume with no checkpoint": (resume_without_checkpoint, "--resume: no complete checkpoint in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, request, capsys):
    setup, expected = CASES[case]
    argv, output = setup(Env(tmp_path, request))
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, err[-2000:]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err
    if output is not None:
        assert not output.exists(), f"{output} was written"


def test_debug_shows_the_traceback_instead(tmp_path):
    from qlora_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        main(["run", "--run-dir", str(tmp_path / "run"), "--preset", "nope", "--debug"])
