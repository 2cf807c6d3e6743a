"""Mutation testing (mutmut) of the functions that carry the pipeline's correctness claims.

    make mutation                       # or: .venv/bin/python bench/mutation.py
    .venv/bin/python bench/mutation.py --report-only

mutmut rewrites each function below many times (an operator flipped, an argument dropped, a
constant changed) and runs the tests that reach it (the [tool.mutmut] test selection in
pyproject.toml). A mutant no test notices "survives": a change the claim's tests cannot see.
Survivors are written to bench/results/mutation.{json,md}, with each one's diff. Interrupted, it
resumes where it stopped (mutmut keeps its results in mutants/).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, machine_line  # noqa: E402

from qlora_pipeline.paths import write_json_atomic, write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")

# claim -> mutmut name patterns: qlora_pipeline.<module>.x_<function>__mutmut_N, or
# ...xǁ<Class>ǁ<method>__mutmut_N; any module, so that a function that moves keeps its claim.
CLAIMS = {
    "chat format (one template, labels on the answers only)": ["qlora_pipeline.*.xǁChatEncoderǁ*"],
    "data split (by tree, the same in every process)": [
        "qlora_pipeline.*.x_tree_split__*",
        "qlora_pipeline.*.x_split_conversations__*",
    ],
    "LoRA target check (every target in every layer)": ["qlora_pipeline.*.x_check_lora_targets__*"],
    "packing (packed conversations cannot see each other)": [
        "qlora_pipeline.*.x_pack_examples__*",
        "qlora_pipeline.*.x_batch_plan__*",
        "qlora_pipeline.*.x_collate_packed__*",
        "qlora_pipeline.*.x_token_losses__*",
    ],
    "data-parallel split (ranks share the micro-batches)": [
        "qlora_pipeline.*.x_step_plan__*",
        "qlora_pipeline.*.x_optimizer_step__*",
        "qlora_pipeline.*.x__train_step__*",
    ],
    "chat prompt building (the encoder's ids reach llama.cpp)": [
        "qlora_pipeline.*.x__llama_encoder__*",
        "qlora_pipeline.*.xǁLlamaChatǁprompt_ids__*",
        "qlora_pipeline.*.xǁLlamaChatǁstream__*",
    ],
}


def run_mutmut(patterns: list[str]) -> tuple[float, int]:
    """Run mutmut over ``patterns``; (seconds, its exit status)."""
    env = {
        **os.environ,
        # the tests' subprocesses (the split in a fresh process, the data-parallel ranks) import
        # the mutated copy too, and mutmut's trampolines read the mutant name from the environment
        "PYTHONPATH": str(REPO / "mutants" / "src"),
        # the runs the tests read (a trained run, ...) are made once, not once per mutant
        "QLORA_TEST_RUN_CACHE": str(REPO / "mutants" / "run-cache"),
    }
    start = time.perf_counter()
    status = subprocess.run([str(MUTMUT), "run", *patterns], cwd=REPO, env=env, check=False).returncode
    return time.perf_counter() - start, status


def mutant_statuses() -> dict[str, str]:
    out = subprocess.run(
        [str(MUTMUT), "results", "--all", "true"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def mutant_diff(name: str) -> str:
    out = subprocess.run([str(MUTMUT), "show", name], cwd=REPO, capture_output=True, text=True, check=False).stdout
    changed = [line for line in out.splitlines() if re.match(r"^[-+](?![-+])", line)]
    return "\n".join(changed)


def claim_of(name: str) -> str | None:
    import fnmatch

    return next((claim for claim, pats in CLAIMS.items() if any(fnmatch.fnmatch(name, p) for p in pats)), None)


def summarize(statuses: dict[str, str], seconds: float | None) -> dict:
    by_claim: dict[str, dict] = {}
    for name, status in sorted(statuses.items()):
        claim = claim_of(name)
        if claim is None:
            continue
        row = by_claim.setdefault(claim, {"counts": Counter(), "survivors": []})
        row["counts"][status] += 1
        if status == "survived":
            row["survivors"].append({"mutant": name, "diff": mutant_diff(name)})
    for row in by_claim.values():
        row["counts"] = dict(row["counts"])
    total = Counter()
    for row in by_claim.values():
        total.update(row["counts"])
    return {"machine": machine(), "seconds": seconds, "totals": dict(total), "claims": by_claim}


def write_report(result: dict) -> None:
    write_json_atomic(RESULTS / "mutation.json", result)
    t = result["totals"]
    lines = [
        "# Mutation testing (mutmut) of the claim-carrying functions",
        "",
        f"Machine: {machine_line(result['machine'])}. Written by `make mutation` (bench/mutation.py).",
        "",
        "| claim | mutants | killed | survived | timeout | not checked |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for claim, row in result["claims"].items():
        c = row["counts"]
        lines.append(
            f"| {claim} | {sum(c.values())} | {c.get('killed', 0)} | {c.get('survived', 0)} | "
            f"{c.get('timeout', 0)} | {c.get('not checked', 0)} |"
        )
    lines += [
        f"| **all** | {sum(t.values())} | {t.get('killed', 0)} | {t.get('survived', 0)} | "
        f"{t.get('timeout', 0)} | {t.get('not checked', 0)} |",
        "",
    ]
    for claim, row in result["claims"].items():
        if row["survivors"]:
            lines += [f"## Survivors: {claim}", ""]
            for s in row["survivors"]:
                lines += [f"`{s['mutant']}`", "", "```diff", s["diff"], "```", ""]
    write_text_atomic(RESULTS / "mutation.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from mutmut's stored results")
    args = parser.parse_args(argv)
    seconds, status = None, 0
    if not args.report_only:
        seconds, status = run_mutmut([p for pats in CLAIMS.values() for p in pats])
    result = summarize(mutant_statuses(), seconds)
    write_report(result)
    t = result["totals"]
    print(
        f"mutation: {sum(t.values())} mutants, {t.get('killed', 0)} killed, {t.get('survived', 0)} survived, "
        f"{t.get('timeout', 0)} timed out -> {RESULTS / 'mutation.md'}"
    )
    if status != 0:  # the report still holds what was checked; the run itself did not finish
        print(f"error: mutmut exited with {status}; run `make mutation` again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
