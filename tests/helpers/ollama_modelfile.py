"""How Ollama reads a Modelfile, for the property tests of our writer: the rules of Ollama's
parser/parser.go (ParseFile, parseRuneForState, unquote), written again in Python because Ollama
cannot be installed here. Only the reading of values is modelled; Go renders the TEMPLATE itself
(tests/modelfile_render/).

- A line is a command (a word of ASCII letters), whitespace, then its value; ``#`` starts a comment.
- ``PARAMETER`` is followed by a name of letters, digits and ``_``, whitespace, then the value.
- A value ends at a line break once the value so far, trimmed, is complete: not quoted, or
  ``"..."`` closed, or ``\"\"\"...\"\"\"`` closed (six characters at least); inside an open quote the
  line break and everything else is kept.
- Characters Go's strconv.IsPrint rejects are dropped, except spaces, tabs and line breaks.
"""

from __future__ import annotations

COMMANDS = {
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
}


class ModelfileSyntaxError(ValueError):
    pass


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        if len(value) >= 6 and value.endswith('"""'):
            return value[3:-3], True
        return "", False
    if value.startswith('"'):
        if len(value) >= 2 and value.endswith('"'):
            return value[1:-1], True
        return "", False
    return value, True


def _go_trim(text: str) -> str:
    return text.strip(" \t\n\r\v\f\x85\xa0")


def parse(text: str) -> list[tuple[str, str]]:
    """[(command, value)] as Ollama reads them; PARAMETER values as (its name, value)."""
    commands: list[tuple[str, str]] = []
    state, buffer, name = "nil", "", ""
    for ch in text:
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch not in " \t\r\n":
                state, buffer = "name", ch
        elif state == "comment":
            if ch in "\r\n":
                state = "nil"
        elif state == "name":
            if ch.isascii() and ch.isalpha():
                buffer += ch
            elif ch in " \t" and buffer.lower() in COMMANDS:
                word = buffer.lower()
                state, buffer = ("parameter", "") if word == "parameter" else ("value", "")
                name = "model" if word == "from" else word
            else:
                raise ModelfileSyntaxError(f"invalid command {buffer!r}")
        elif state == "parameter":
            if ch.isascii() and (ch.isalnum() or ch == "_"):
                buffer += ch
            elif ch in " \t":
                state, name, buffer = "value", buffer, ""
            else:
                raise ModelfileSyntaxError(f"invalid parameter name {buffer!r}")
        elif ch in "\r\n":  # state "value": a line break ends a complete value
            value, complete = _unquote(_go_trim(buffer))
            if not complete:
                buffer += ch
                continue
            commands.append((name, value))
            state, buffer = "nil", ""
        elif ch in " \t" or ch.isprintable():
            buffer += ch
    if state == "value":
        value, complete = _unquote(_go_trim(buffer))
        if not complete:
            raise ModelfileSyntaxError("unexpected end of file inside a quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ModelfileSyntaxError("unexpected end of file")
    return commands
