"""Import cycles between the modules of src/qlora_pipeline (function-level imports included).

    .venv/bin/python scripts/import_cycles.py        # prints each cycle, then the count; exit 1 if any

grimp (the graph import-linter builds on) reads every import statement, at any depth; a cycle
hidden in a function-level import is still a cycle of the design.
"""

from __future__ import annotations

import sys


def import_cycles(package: str = "qlora_pipeline") -> list[list[str]]:
    """Each elementary cycle once, as a list of modules (strongly connected components of size > 1,
    and self-imports), found with Tarjan's algorithm over grimp's graph."""
    import grimp

    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(modules)) for m in modules}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in modules:
        if module not in index:
            visit(module)
    return found


if __name__ == "__main__":
    cycles = import_cycles()
    for cycle in cycles:
        print(" <-> ".join(cycle))
    print(f"{len(cycles)} import cycle(s) in src/qlora_pipeline")
    sys.exit(1 if cycles else 0)
