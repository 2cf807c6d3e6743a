"""Security: no pickle loading, no remote code, no token in a log or a run folder.

The source is read with ``ast`` so that a new call site cannot slip past: every ``torch.load``
must say ``weights_only=True`` and every ``trust_remote_code`` must be the constant False. The
refusal of pickle-only models and adapters is in the bad-input table; the token is checked on
a real run (test_cli.py runs the stages with HF_TOKEN set and greps the folder with
``assert_no_token``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

SOURCES = sorted(
    (REPO / "src" / "qlora_pipeline").rglob("*.py")
)  # subpackages too + sorted((REPO / "app").glob("*.py"))
FAKE_TOKEN = "hf_pipelineTestTokenDoNotLog0123456789"


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return f"{getattr(func.value, 'id', '?')}.{func.attr}"
    return getattr(func, "id", "?")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_torch_load_is_weights_only_and_remote_code_is_off(path):
    for node in calls(path):
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{path.name}:{node.lineno}"
        if call_name(node) == "torch.load":
            value = keywords.get("weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{where}: torch.load without weights_only=True"
            )
        if "trust_remote_code" in keywords:
            value = keywords["trust_remote_code"]
            assert isinstance(value, ast.Constant) and value.value is False, f"{where}: trust_remote_code not False"
        assert call_name(node) not in ("pickle.load", "pickle.loads"), f"{where}: pickle"


def test_the_scan_sees_the_call_sites():
    """The scan would catch a bad call: the known good ones are found."""
    found = {
        (p.name, call_name(n))
        for p in SOURCES
        for n in calls(p)
        if call_name(n) == "torch.load" or any(k.arg == "trust_remote_code" for k in n.keywords)
    }
    assert ("checkpoints.py", "torch.load") in found
    assert ("model.py", "AutoModelForCausalLM.from_pretrained") in found


def assert_no_token(folder: Path, *texts: str) -> None:
    """Neither a file under ``folder`` nor any of ``texts`` (logs) holds FAKE_TOKEN."""
    assert all(FAKE_TOKEN not in text for text in texts), "the token was logged"
    needle = FAKE_TOKEN.encode()
    leaks = [f for f in folder.rglob("*") if f.is_file() and needle in f.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"


def test_assert_no_token_finds_a_leak(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "log.txt").write_text(f"token={FAKE_TOKEN}")
    with pytest.raises(AssertionError, match="written to"):
        assert_no_token(tmp_path)
    with pytest.raises(AssertionError, match="logged"):
        assert_no_token(tmp_path / "a" / "b" / "nothing", f"Bearer {FAKE_TOKEN}")
