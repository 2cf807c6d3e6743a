"""A subset of Go's text/template, enough to render an Ollama chat template in a test:
``{{ range .Messages }}``, ``{{ if C }}`` / ``{{ else if C }}`` / ``{{ else }}`` / ``{{ end }}``,
``{{ .Field }}``, the functions ``eq``, ``ne``, ``and``, ``or``, ``not``, string literals,
parentheses and the ``{{-`` / ``-}}`` trim markers. Ollama cannot be installed here; anything
outside the subset raises instead of rendering wrongly."""

from __future__ import annotations

import re
import shlex

ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", ...), ("action", ...)] with the trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in ACTION.finditer(template):
        text = template[pos : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list, i: int = 0, stop=("end",)) -> tuple[list, int, str]:
    """Nodes until an action in ``stop``; returns (nodes, next index, the stopping action)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(" ", 1)[0]
        if value == "end" or value == "else" or value.startswith("else if ") or word in stop:
            return nodes, i, value
        if word == "range":
            body, i, _ = _parse(tokens, i)
            nodes.append(("range", value[len("range ") :], body))
        elif word == "if":
            branches, otherwise = [], []
            condition = value[len("if ") :]
            while True:
                body, i, ended = _parse(tokens, i)
                branches.append((condition, body))
                if ended.startswith("else if "):
                    condition = ended[len("else if ") :]
                    continue
                if ended == "else":
                    otherwise, i, _ = _parse(tokens, i)
                break
            nodes.append(("if", branches, otherwise))
        else:
            nodes.append(("value", value))
    return nodes, i, ""


def _split_args(expr: str) -> list[str]:
    """Top-level words of an expression, a parenthesised group kept whole."""
    args, depth, current = [], 0, ""
    for ch in expr + " ":
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == " " and depth == 0:
            if current:
                args.append(current)
            current = ""
        else:
            current += ch
    return args


def _evaluate(expr: str, dot):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        return _evaluate(expr[1:-1], dot)
    if expr.startswith('"'):
        return shlex.split(expr)[0]
    if expr == ".":
        return dot
    if expr.startswith("."):
        return dot[expr[1:]]
    name, *args = _split_args(expr)
    values = [_evaluate(a, dot) for a in args]
    functions = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "and": lambda *v: next((x for x in v if not x), v[-1]),
        "or": lambda *v: next((x for x in v if x), v[-1]),
        "not": lambda a: not a,
    }
    if name not in functions:
        raise NotImplementedError(f"{name!r} is outside this test's Go template subset")
    return functions[name](*values)


def _render(nodes: list, dot) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(_evaluate(node[1], dot)))
        elif node[0] == "range":
            for item in _evaluate(node[1], dot):
                out.append(_render(node[2], item))
        else:
            _, branches, otherwise = node
            chosen = next((body for condition, body in branches if _evaluate(condition, dot)), otherwise)
            out.append(_render(chosen, dot))
    return "".join(out)


def render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_tokens(template), stop=())
    return _render(nodes, data)
