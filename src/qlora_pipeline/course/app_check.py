"""The app, checked from outside: served in a subprocess, driven by a real browser and by gradio_client.

Used by the tests and by ``make screenshot``:

    python -m qlora_pipeline.course.app_check screenshot --model runs/demo/gguf/model-Q4_K_M.gguf --out S29-gradio.png

The browser is Debian's Chromium (``apt-get install chromium``) driven by Playwright's Python
package; Playwright's own browser download is never used (the machine has no internet).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_pipeline.errors import PipelineError

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Headless as root on a closed network: without the background-networking flags Chromium keeps
# trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise PipelineError(
                f"the server exited with {proc.returncode} before answering: "
                f"{log.read_text()[-1500:] if log.exists() else ''}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise PipelineError(f"{url} did not answer within {timeout:.0f} s; see {log}")


@contextmanager
def served(
    command: list[str],
    ready_path: str = "/",
    timeout: float = 120,
    env: dict | None = None,
    log: Path | None = None,
    started: list | None = None,
    cwd: Path | None = None,
) -> Iterator[str]:
    """Run a server command with ``{port}`` filled in; yield its base URL; stop it afterwards.
    ``started``, if given, receives the server's Popen (a test reads its sockets)."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    log = Path(log or f"/tmp/qlora-served-{port}.log")
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
    if started is not None:
        started.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + ready_path, proc, timeout, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def app_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlora_pipeline.cli", "app", "--port", "{port}", *args]


def _set_slider(page, elem_id: str, value: float, timeout_s: float) -> None:
    slider = page.locator(f"#{elem_id} input[type=range]")
    if not slider.is_visible():  # the controls are folded (a narrow window)
        page.get_by_text("Model and sampling").click()
    slider.wait_for(state="visible", timeout=timeout_s * 1000)
    slider.fill(str(value))
    slider.dispatch_event("change")  # Gradio takes the value on release


def browser_exchange(
    url: str,
    message: str,
    temperature: float = 0.0,
    screenshot: Path | None = None,
    timeout_s: float = 60,
    repeat_penalty: float | None = None,
    system: str | None = None,
) -> dict:
    """Open the app, move the temperature slider (and, if given, the repetition penalty and the
    system prompt), send ``message``, wait for the streamed answer.

    Returns the answer, the status line, page errors and any error toast. Raises when no answer
    came back in time.
    """
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise PipelineError(
            f"{CHROMIUM} not found: install Debian's Chromium (apt-get install chromium) "
            "or set CHROMIUM to a Chromium binary"
        )
    page_errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(url, wait_until="load")
            page.locator("#chat-input textarea").wait_for(state="visible", timeout=timeout_s * 1000)
            _set_slider(page, "temperature", temperature, timeout_s)
            if repeat_penalty is not None:
                _set_slider(page, "repeat-penalty", repeat_penalty, timeout_s)
            if system is not None:
                page.locator("#system-prompt textarea").fill(system)
            box = page.locator("#chat-input textarea")
            box.fill(message)
            box.press("Enter")
            answer = page.locator("#chatbot .bot-row .message-content").last
            answer.wait_for(state="visible", timeout=timeout_s * 1000)
            # The status line gets its tokens/s when the answer is complete.
            page.locator("#status-line", has_text="tokens").wait_for(timeout=timeout_s * 1000)
            toasts = page.locator(".toast-body")
            result = {
                "answer": answer.inner_text().strip(),
                "user": page.locator("#chatbot .user-row .message-content").last.inner_text().strip(),
                "status": page.locator("#status-line").inner_text().strip(),
                "error_toasts": [toasts.nth(i).inner_text() for i in range(toasts.count())],
                "page_errors": page_errors,
            }
            if screenshot is not None:
                tmp = Path(screenshot).with_suffix(".tmp.png")
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(tmp), full_page=True)
                os.replace(tmp, screenshot)
            return result
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="screenshot the running app after one exchange")
    parser.add_argument("command", choices=["screenshot"])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("S29-gradio.png"))
    # A held-out question of report.json, asked as the report asks it: greedy, no repetition
    # penalty, no system turn; the answer is whatever the model says.
    parser.add_argument("--message", default="What is the capital of France?")
    args = parser.parse_args(argv)
    try:
        if not args.model.is_file():
            raise PipelineError(f"{args.model} does not exist; run `make demo` first")
        with served(app_command("--model", str(args.model))) as url:
            result = browser_exchange(url, args.message, screenshot=args.out, repeat_penalty=1.0, system="")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: asked {args.message!r}, answered {result['answer']!r} ({result['status']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
