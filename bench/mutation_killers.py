"""Which test kills each named mutant: run by bench/mutation.py in mutants/ (PYTHONPATH=mutants/src).

    python bench/mutation_killers.py OUT.json NAME [NAME ...]

For each mutant, its tests (mutmut's record of which tests call its function) run fastest first in
this one process, the mutant switched on through MUTANT_UNDER_TEST as mutmut's own workers do, and
the first test that fails is written down. One process for all: no interpreter start per mutant.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest


class FirstFailure:
    def __init__(self) -> None:
        self.nodeid: str | None = None

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and self.nodeid is None:
            self.nodeid = report.nodeid


def main(out: str, names: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # as `python -m pytest` does: the tests import each other as tests.*
    stats = json.loads(Path("mutmut-stats.json").read_text(encoding="utf-8"))
    durations = stats["duration_by_test"]
    killers: dict[str, str | None] = {}
    for name in names:
        function = re.sub(r"__mutmut_\d+$", "", name)
        tests = sorted(stats["tests_by_mangled_function_name"].get(function, []), key=lambda t: durations.get(t, 0))
        if not tests:
            killers[name] = None
            continue
        os.environ["MUTANT_UNDER_TEST"] = name
        recorder = FirstFailure()
        pytest.main(
            ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "--rootdir=.", *tests], plugins=[recorder]
        )
        killers[name] = recorder.nodeid
    os.environ.pop("MUTANT_UNDER_TEST", None)
    Path(out).write_text(json.dumps(killers, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
