"""llama.cpp's converter, vocab and chat template, taken from the llama-cpp-python sources.

    python -m qlora_pipeline.gguf.llamacpp          # fetch once (make setup does this); prints the folder

The original course ran ``git clone llama.cpp``. We need the converter at the *same commit*
as the runtime that will load its output, and no network beyond the package registry; the
llama-cpp-python source distribution of the installed version carries exactly that in
``vendor/llama.cpp``. We extract only what the pipeline uses into a cache folder, once.
Set ``LLAMA_CPP_DIR`` to a llama.cpp checkout to use that instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.paths import cache_root

# What the pipeline uses from a llama.cpp tree, relative to its root.
CONVERTER = "convert_hf_to_gguf.py"
NEEDED = (
    CONVERTER,
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "models/ggml-vocab-phi-3.gguf",
    "models/ggml-vocab-phi-3.gguf.inp",
    "models/ggml-vocab-phi-3.gguf.out",
    "models/templates/microsoft-Phi-3.5-mini-instruct.jinja",
)
COMPLETE_MARKER = ".complete"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"  # as in llama.cpp's tests/test-tokenizer-0.cpp


@dataclass(frozen=True)
class LlamaCppFiles:
    root: Path

    @property
    def converter(self) -> Path:
        return self.root / CONVERTER

    @property
    def phi3_vocab(self) -> Path:
        return self.root / "models" / "ggml-vocab-phi-3.gguf"

    @property
    def phi3_vocab_tests(self) -> tuple[Path, Path]:
        return (self.root / "models" / "ggml-vocab-phi-3.gguf.inp", self.root / "models" / "ggml-vocab-phi-3.gguf.out")

    @property
    def phi35_chat_template(self) -> Path:
        return self.root / "models" / "templates" / "microsoft-Phi-3.5-mini-instruct.jinja"


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise PipelineError(
            "llama-cpp-python is not installed; run `make setup` (or pip install -r requirements.txt)"
        ) from None


def _missing(root: Path) -> list[str]:
    return [rel for rel in NEEDED if not (root / rel).exists()]


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        "-d",
        str(into),
        f"llama-cpp-python=={version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(into.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PipelineError(
            f"could not download the llama-cpp-python {version} source distribution ({detail}); "
            "connect to the package index once, or set LLAMA_CPP_DIR to a llama.cpp checkout"
        )
    return archives[0]


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                continue
            rel = parts[1][len("vendor/llama.cpp/") :]
            if any(rel == n or (n.endswith("/") and rel.startswith(n)) for n in NEEDED):
                if not (member.isfile() or member.isdir()):
                    continue  # no links or devices out of an archive
                member.name = rel
                members.append(member)
        tar.extractall(dest, members=members, filter="data")


def ensure_llama_cpp(version: str | None = None) -> LlamaCppFiles:
    """Return the llama.cpp files, extracting them from the sdist into the cache if needed."""
    override = os.environ.get("LLAMA_CPP_DIR")
    if override:
        root = Path(override).expanduser()
        missing = _missing(root)
        if missing:
            raise PipelineError(
                f"LLAMA_CPP_DIR={root} lacks {', '.join(missing)}; point it at a llama.cpp "
                "checkout or unset it to use the copy from llama-cpp-python"
            )
        return LlamaCppFiles(root)

    version = version or installed_version()
    root = cache_root() / f"llama.cpp-{version}"
    if (root / COMPLETE_MARKER).exists() and not _missing(root):
        return LlamaCppFiles(root)

    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".llama.cpp-tmp-") as tmp:
        tmp_path = Path(tmp)
        archive = _download_sdist(version, tmp_path / "sdist")
        staging = tmp_path / "tree"
        staging.mkdir()
        _extract(archive, staging)
        missing = _missing(staging)
        if missing:
            raise PipelineError(
                f"the llama-cpp-python {version} sources lack {', '.join(missing)}; "
                "set LLAMA_CPP_DIR to a llama.cpp checkout that has them"
            )
        (staging / COMPLETE_MARKER).write_text(version + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)  # atomic: the cache is complete or absent
    return LlamaCppFiles(root)


def read_vocab_tests(files: LlamaCppFiles) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors: (text, expected ids without BOS)."""
    inp, out = files.phi3_vocab_tests
    raw = inp.read_text(encoding="utf-8")
    texts = []
    pos = 0
    while pos < len(raw):  # the same splitting as tests/test-tokenizer-0.cpp
        nxt = raw.find(TEST_SEPARATOR, pos)
        if nxt == -1:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(TEST_SEPARATOR)
    expected = [[int(t) for t in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    if len(texts) != len(expected):
        raise PipelineError(f"{inp} and {out} hold different numbers of tests ({len(texts)} vs {len(expected)})")
    return list(zip(texts, expected))


if __name__ == "__main__":
    print(ensure_llama_cpp().root)
