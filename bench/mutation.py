"""Mutation testing (mutmut) of the functions that carry the pipeline's correctness claims.

    make mutation                       # or: .venv/bin/python bench/mutation.py
    .venv/bin/python bench/mutation.py --report-only

mutmut rewrites each function below many times (an operator flipped, an argument dropped, a
constant changed) and runs, for each mutant, the tests that called its function in a first
instrumented run (mutmut's per-function coverage of the [tool.mutmut] test selection), fastest
first, stopping at the first failure. A mutant no test notices "survives".

A mutant that only rewords an error or log message (``"XX" + text + "XX"``, upper or lower case,
in a ``raise``, an ``...Error(...)`` or a ``print``/``log`` call) is counted apart and not run: a
message's wording is not a claim. A survivor is either killed by a test added since (the report
names the test that now kills it) or explained as equivalent in bench/mutation_equivalent.yaml.
Results: bench/results/mutation.{json,md}. Interrupted, it resumes: mutants with a result keep it.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from difflib import unified_diff
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, machine_line  # noqa: E402

from qlora_pipeline.paths import write_json_atomic, write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")
EQUIVALENT = Path(__file__).resolve().parent / "mutation_equivalent.yaml"

# claim -> mutmut name patterns: qlora_pipeline.<module>.x_<function>__mutmut_N, or
# ...xǁ<Class>ǁ<method>__mutmut_N. The first claim whose pattern matches takes the mutant.
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
        "qlora_pipeline.*.xǁLlamaChatǁstream__*",
    ],
    "history trim (the oldest turns go first, the system prompt stays)": [
        "qlora_pipeline.*.xǁLlamaChatǁprompt_ids__*",
        "qlora_pipeline.*.xǁOpenAIBackendǁ_open_fitting__*",
    ],
    "importance matrix (collection, names, quantizing with it)": [
        "qlora_pipeline.gguf.imatrix.*",
        "qlora_pipeline.*.x__quantize_params__*",
        "qlora_pipeline.*.x_quantize_gguf__*",
        "qlora_pipeline.*.x_split_variant__*",
        "qlora_pipeline.*.x_check_quant_types__*",
        "qlora_pipeline.*.x__importance_matrix__*",
    ],
    "request body limit (413 before the body is read)": [
        "qlora_pipeline.*.xǁBodyLimitǁ*",
        "qlora_pipeline.*.xǁ_StreamGuardǁ*",
    ],
    "export pre-checks (vocabulary, template, name, RoPE)": ["qlora_pipeline.gguf.checks.*"],
    "push: file selection and model card": [
        f"qlora_pipeline.publish.x_{name}__*"
        for name in (
            "_optional_gguf_files",
            "_folder_files",
            "files_to_push",
            "models_manifest",
            "served_file",
            "_hub_base",
            "card_data",
            "_settings_section",
            "_preference_settings",
            "_scorecard_section",
            "_usage_section",
            "render_card",
        )
    ],
    "pull of a run part (the next notebook gets what was pushed)": [
        f"qlora_pipeline.hub.x_{name}__*"
        for name in ("pull_run_part", "_place_tree", "_place", "_download", "_restore_extras")
    ],
    "Drive run folder (small on Drive, large on the VM)": [
        "qlora_pipeline.*.x_course_run_dir__*",
        "qlora_pipeline.*.x_place_large_files__*",
        "qlora_pipeline.*.xǁRunLayoutǁlarge_root__*",
        "qlora_pipeline.*.xǁRunLayoutǁresolve__*",
        "qlora_pipeline.*.xǁRunLayoutǁrelative__*",
    ],
    "preference pairs (best against worst ranked reply) and the adapter later stages take": [
        "qlora_pipeline.pairs.*",
        "qlora_pipeline.*.xǁRunLayoutǁhas_dpo_adapter__*",
        "qlora_pipeline.*.xǁRunLayoutǁadapter_for__*",
    ],
}

# Calls whose string arguments are messages for a person: errors, warnings, logs, progress.
MESSAGE_CALL = re.compile(r"(Error|Exception|Warning|^print|^log|^say|^warn|^info|^debug|^error|^warning)$")
STRING = re.compile(r"""[rRbBfFuU]{0,2}("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


def claim_of(name: str) -> str | None:
    return next((claim for claim, pats in CLAIMS.items() if any(fnmatch.fnmatch(name, p) for p in pats)), None)


def message_lines(source: str) -> set[int]:
    """Lines of ``source`` inside a raise statement or a call that takes a message."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        is_message = isinstance(node, ast.Raise)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            is_message = bool(MESSAGE_CALL.search(name))
        if is_message:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def only_strings_differ(removed: str, added: str) -> bool:
    """The lines differ only in the literal text of strings: an f-string's {...} parts are code and
    must stay the same, and a string replaced by None is not a rewording."""

    def blank(line: str) -> str:
        def literal(match: re.Match) -> str:
            prefix = match.group(0)[: match.start(1) - match.start(0)]
            code = re.findall(r"{[^{}]*}", match.group(1)) if "f" in prefix.lower() else []
            return '""' + "".join(code)

        return STRING.sub(literal, line)

    return removed != added and blank(removed) == blank(added)


def is_message_wording(diff: str, source_lines: list[str], messages: set[int]) -> bool:
    """True when every changed line only changes string literals on lines that are messages."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if not removed or len(removed) != len(added):
        return False
    for old, new in zip(removed, added):
        if not only_strings_differ(old, new):
            return False
        where = {i + 1 for i, text in enumerate(source_lines) if text.strip() == old.strip()}
        if not where or not where <= messages:
            return False
    return True


def generate_mutants() -> dict[str, dict]:
    """Write mutants/ (mutmut's own generation step, without a test run) and describe each mutant of
    a claim: {name: {claim, file, diff, message}}. mutmut 3.8 (pinned) has no command for this."""
    from mutmut.__main__ import (
        copy_also_copy_files,
        copy_src_dir,
        create_mutants,
        set_mutant_under_test,
        setup_source_paths,
    )
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import read_mutant_function, read_mutants_module, read_original_function
    from mutmut.utils.file_utils import walk_mutatable_files

    os.chdir(REPO)
    set_mutant_under_test("mutant_generation")
    os.makedirs("mutants", exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(os.cpu_count() or 2)
    os.environ.pop("MUTANT_UNDER_TEST", None)

    import libcst as cst

    found: dict[str, dict] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        names = [n for n in data.exit_code_by_key if claim_of(n)]
        if not names:
            continue
        source = Path(path).read_text(encoding="utf-8")
        messages, source_lines = message_lines(source), source.splitlines()
        module = read_mutants_module(path)
        for name in names:
            old, new = (
                cst.Module([fn]).code.strip().split("\n")
                for fn in (read_original_function(module, name), read_mutant_function(module, name))
            )
            diff = "\n".join(unified_diff(old, new, lineterm="", n=0))
            found[name] = {
                "claim": claim_of(name),
                "file": str(path),
                "diff": "\n".join(line for line in diff.splitlines() if re.match(r"^[-+](?![-+])", line)),
                "message": is_message_wording(diff, source_lines, messages),
            }
    return found


def mutant_statuses() -> dict[str, str]:
    out = subprocess.run(
        [str(MUTMUT), "results", "--all", "true"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def mutmut_env() -> dict[str, str]:
    return {
        **os.environ,
        # the tests' subprocesses (the split in a fresh process, the data-parallel ranks, the Space)
        # import the mutated copy too; mutmut's trampolines read the mutant name from the environment
        "PYTHONPATH": str(REPO / "mutants" / "src"),
        # the runs the tests read (a trained run, ...) are made once, not once per mutant
        "QLORA_TEST_RUN_CACHE": str(REPO / "mutants" / "run-cache"),
        # tests/conftest.py runs the selected tests fastest first, from mutmut's recorded durations
        "QLORA_MUTATION_STATS": str(REPO / "mutants" / "mutmut-stats.json"),
    }


def run_mutmut(names: list[str], max_test_seconds: float | None = None) -> int:
    """Run mutmut on ``names`` (explicit mutant names: mutmut re-runs those, so only the ones that need
    it are passed), leaving out tests slower than ``max_test_seconds``; its exit status."""
    if not names:
        return 0
    env = {**mutmut_env(), "QLORA_MUTATION_MAX_SECONDS": str(max_test_seconds or "")}
    return subprocess.run([str(MUTMUT), "run", *names], cwd=REPO, env=env, check=False).returncode


def killing_tests(names: list[str]) -> dict[str, str | None]:
    """The first test (fastest first) that fails with each mutant on, for the report: one process for
    all of them (bench/mutation_killers.py)."""
    if not names:
        return {}
    out = REPO / "mutants" / "killers.json"
    out.unlink(missing_ok=True)  # never a previous run's answer
    script = Path(__file__).resolve().parent / "mutation_killers.py"
    subprocess.run(
        [sys.executable, str(script), str(out), *names],
        cwd=REPO / "mutants",
        env=mutmut_env(),
        capture_output=True,
        check=False,
    )
    return json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}


DETECTED = ("killed", "timeout", "segfault", "suspicious")


def merge_history(inventory: dict[str, dict], statuses: dict[str, str], previous: dict, full: set[str]) -> dict:
    """Each mutant with its status now, its verdict in the first complete run (a kill, or a survival
    against every one of its tests), and the test that kills a first-run survivor now. History is
    kept only while the mutant's diff is the same. ``full``: survivors just run with every test."""
    merged = {}
    for name, info in inventory.items():
        before = previous.get(name, {}) if previous.get(name, {}).get("diff") == info["diff"] else {}
        status = "message wording (not run)" if info["message"] else statuses.get(name, "not checked")
        kept = before.get("all_tests", False) and before.get("status") == status
        all_tests = kept or name in full or status in (*DETECTED, "no tests")
        first = before.get("first_status") or (status if all_tests and status != "not checked" else None)
        merged[name] = {
            **info,
            "status": status,
            "all_tests": all_tests,
            "first_status": first,
            "killed_by": before.get("killed_by"),
        }
    return merged


def name_killers(mutants: dict[str, dict]) -> None:
    todo = [
        n
        for n, m in mutants.items()
        if m["first_status"] in ("survived", "no tests") and m["status"] in DETECTED and not m["killed_by"]
    ]
    found = killing_tests(todo)
    for name in todo:
        mutants[name]["killed_by"] = found.get(name) or "(killed in mutmut's run; not reproduced alone)"


def summarize(mutants: dict[str, dict], equivalent: dict[str, str], runs: list[dict]) -> dict:
    claims: dict[str, dict] = {claim: {"counts": Counter(), "survivors": []} for claim in CLAIMS}
    for name, m in sorted(mutants.items()):
        row = claims[m["claim"]]
        status = m["status"]
        if status == "survived" and name in equivalent:
            status = "equivalent"
        elif status == "survived" and not m["all_tests"]:  # survived the fast pass only
            status = "not checked"
        elif status == "no tests":  # no selected test calls the function: a survivor
            status = "survived"
        row["counts"][status if status not in DETECTED else "killed"] += 1
        if status in ("survived", "equivalent") or (m["first_status"] in ("survived", "no tests")):
            row["survivors"].append(
                {
                    "mutant": name,
                    "diff": m["diff"],
                    "status": status if status != "killed" else m["status"],
                    "equivalent": equivalent.get(name) if status == "equivalent" else None,
                    "killed_by": m["killed_by"] if m["status"] in DETECTED else None,
                }
            )
    totals: Counter = Counter()
    for row in claims.values():
        c = row["counts"]
        judged = c["killed"] + c["survived"]
        row["score"] = round(100 * c["killed"] / judged, 1) if judged else None
        row["counts"] = dict(c)
        totals.update(c)
    judged = totals["killed"] + totals["survived"]
    return {
        "machine": machine(),
        "runs": runs,
        "totals": dict(totals),
        "score": round(100 * totals["killed"] / judged, 1) if judged else None,
        "claims": claims,
        "mutants": mutants,
    }


def write_report(result: dict) -> None:
    write_json_atomic(RESULTS / "mutation.json", result)
    t = result["totals"]
    runs = "; ".join(f"{r['what']}: {r['mutants']} in {r['seconds'] / 60:.0f} min" for r in result["runs"])
    wall = f"runs: {runs}" if runs else "no run recorded"
    lines = [
        "# Mutation testing (mutmut) of the claim-carrying functions",
        "",
        f"Machine: {machine_line(result['machine'])}. Written by `make mutation` (bench/mutation.py); {wall}.",
        "",
        "Score: killed (timeouts included) / (mutants - message wording - equivalent). Message wording:",
        "mutants that only reword an error or log message, not run. Equivalent: survivors no test can",
        "kill, each with its reason below (bench/mutation_equivalent.yaml).",
        "",
        "| claim | mutants | message wording | equivalent | killed | survived | not checked | score |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(label: str, c: dict, score) -> str:
        return (
            f"| {label} | {sum(c.values())} | {c.get('message wording (not run)', 0)} | {c.get('equivalent', 0)} | "
            f"{c.get('killed', 0)} | {c.get('survived', 0)} | {c.get('not checked', 0)} | "
            f"{'-' if score is None else f'{score}%'} |"
        )

    for claim, r in result["claims"].items():
        lines.append(row(claim, r["counts"], r["score"]))
    lines += [row("**all**", t, result["score"]), ""]
    for claim, r in result["claims"].items():
        if not r["survivors"]:
            continue
        lines += [f"## Survivors of the first run: {claim}", ""]
        for s in r["survivors"]:
            if s["killed_by"]:
                verdict = f"killed now by `{s['killed_by']}`"
            elif s["equivalent"]:
                verdict = f"equivalent: {s['equivalent']}"
            elif s["status"] == "not checked":
                verdict = "not checked again with every test since its function's tests changed"
            else:
                verdict = "**survives, not explained**"
            lines += [f"`{s['mutant']}`: {verdict}", "", "```diff", s["diff"], "```", ""]
    write_text_atomic(RESULTS / "mutation.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from mutmut's stored results")
    parser.add_argument("--recheck", action="store_true", help="run every survivor again (after adding tests)")
    parser.add_argument(
        "--max-test-seconds",
        type=float,
        default=2.5,
        help="first pass: leave out tests slower than this; its survivors then run with every test",
    )
    parser.add_argument(
        "--claims", nargs="*", default=None, help="run only the claims whose name contains one of these words"
    )
    args = parser.parse_args(argv)
    before = json.loads((RESULTS / "mutation.json").read_text("utf-8")) if (RESULTS / "mutation.json").is_file() else {}
    previous, runs = before.get("mutants", {}), before.get("runs", [])
    equivalent = (yaml.safe_load(EQUIVALENT.read_text(encoding="utf-8")) or {}) if EQUIVALENT.is_file() else {}
    inventory = generate_mutants()
    status, full = 0, set()
    if not args.report_only:
        statuses = mutant_statuses()
        chosen = {n for n, m in inventory.items() if not args.claims or any(w in m["claim"] for w in args.claims)}
        unchecked = [
            n
            for n, m in inventory.items()
            if n in chosen and not m["message"] and statuses.get(n, "not checked") == "not checked"
        ]
        status = timed_run(runs, "unchecked mutants, fast tests", unchecked, args.max_test_seconds)
        statuses = mutant_statuses()
        survivors = [
            n
            for n, m in inventory.items()
            if n in chosen
            and statuses.get(n) in ("survived", "no tests")
            and (args.recheck or not (previous.get(n, {}).get("all_tests") and previous[n].get("diff") == m["diff"]))
        ]
        if status == 0:
            status = timed_run(runs, "survivors, every test", survivors, None)
            full = set(survivors)
    mutants = merge_history(inventory, mutant_statuses(), previous, full)
    name_killers(mutants)
    result = summarize(mutants, equivalent, runs)
    write_report(result)
    t = result["totals"]
    print(
        f"mutation: {sum(t.values())} mutants, {t.get('message wording (not run)', 0)} message wording, "
        f"{t.get('killed', 0)} killed, {t.get('survived', 0)} survived, {t.get('equivalent', 0)} equivalent, "
        f"score {result['score']}% -> {RESULTS / 'mutation.md'}"
    )
    if status != 0:  # the report still holds what was checked; the run itself did not finish
        print(f"error: mutmut exited with {status}; run `make mutation` again to resume", file=sys.stderr)
        return 1
    return 0


def timed_run(runs: list[dict], what: str, names: list[str], max_test_seconds: float | None) -> int:
    print(f"mutation: {what}: {len(names)} to run", flush=True)
    started = time.perf_counter()
    status = run_mutmut(names, max_test_seconds)
    if names:
        runs.append(
            {"what": what, "mutants": len(names), "seconds": round(time.perf_counter() - started), "exit": status}
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
