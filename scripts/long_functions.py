"""Functions longer than a limit (default 80 lines, decorators and docstring included).

.venv/bin/python scripts/long_functions.py            # src/: prints each, then the count
.venv/bin/python scripts/long_functions.py --max 60 src bench
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def long_functions(roots: list[Path], limit: int) -> list[tuple[int, str, str]]:
    """(lines, file:line, name) of every function or method over ``limit`` lines, longest first."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    lines = node.end_lineno - first + 1
                    if lines > limit:
                        found.append((lines, f"{path.relative_to(REPO)}:{node.lineno}", node.name))
    return sorted(found, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", default=["src"], help="folders to scan (default: src)")
    parser.add_argument("--max", type=int, default=80, help="the longest a function may be (default 80 lines)")
    args = parser.parse_args(argv)
    found = long_functions([REPO / r for r in args.roots], args.max)
    for lines, where, name in found:
        print(f"{lines:5d}  {where}  {name}")
    print(f"{len(found)} function(s) over {args.max} lines in {', '.join(args.roots)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
