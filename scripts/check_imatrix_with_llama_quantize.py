"""Check a run's importance matrix with llama.cpp's own ``llama-quantize --imatrix``: it must read
``gguf/imatrix.gguf`` and write the same tensors as our ``<TYPE>-imat`` files.

    .venv/bin/python scripts/check_imatrix_with_llama_quantize.py LLAMA_QUANTIZE RUN TYPE...

LLAMA_QUANTIZE is a ``llama-quantize`` binary built from the same llama.cpp as the installed
llama-cpp-python (its sdist's ``vendor/llama.cpp``: ``cmake -B build && cmake --build build
--target llama-quantize``); the wheel does not ship one, so this is not part of ``make test``.
RUN must hold ``model-F16.gguf``, ``imatrix.gguf`` and ``model-<TYPE>-imat.gguf`` for each TYPE.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    import numpy as np
    from gguf import GGUFReader

    ours = {t.name: np.asarray(t.data) for t in GGUFReader(str(b)).tensors}
    theirs = {t.name: np.asarray(t.data) for t in GGUFReader(str(a)).tensors}
    return sum(np.array_equal(theirs[n], ours.get(n)) for n in theirs), len(theirs)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    binary, gguf, types = Path(argv[0]), Path(argv[1]) / "gguf", argv[2:]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for quant in types:
            out = Path(tmp) / f"{quant}.gguf"
            run = subprocess.run(
                [str(binary), "--imatrix", str(gguf / "imatrix.gguf"), str(gguf / "model-F16.gguf"), str(out), quant],
                capture_output=True,
                text=True,
            )
            loaded = next((line for line in run.stdout.splitlines() if "loaded" in line and "imatrix" in line), "")
            same, total = identical_tensors(out, gguf / f"model-{quant}-imat.gguf") if run.returncode == 0 else (0, 0)
            print(f"{quant}: llama-quantize exit {run.returncode}; {loaded.strip()}; {same}/{total} tensors identical")
            failed += run.returncode != 0 or same != total or total == 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
