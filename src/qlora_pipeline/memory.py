"""Peak memory of processes while they work: the one sampler the notebook rehearsal and bench/ use.

RSS also counts pages of files a process maps (the safetensors and GGUF loaders map their
input): page cache the kernel can drop. ``RssAnon`` (/proc/PID/status) is the resident memory no
file backs, what a model's tensors really hold; both are sampled, summed over the processes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class MemorySampler:
    """Timeline and peaks of the summed RSS and anonymous RSS of a process tree, sampled every
    ``interval`` seconds in a background thread: the children of this process (default), or
    ``pid`` and its children."""

    def __init__(self, interval: float = 0.5, pid: int | None = None):
        self.interval = interval
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []  # (seconds, RSS, anonymous)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anonymous(pid: int) -> int:
        """RssAnon: the resident memory that no file backs (a model's tensors, not its mapped files)."""
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _processes(self) -> list:
        import psutil

        if self.pid is None:
            return psutil.Process().children(recursive=True)
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def _measure(self) -> tuple[int, int]:
        import psutil

        rss = anon = 0
        try:
            processes = self._processes()
        except psutil.Error:  # the watched process has ended
            return 0, 0
        for process in processes:
            try:
                rss += process.memory_info().rss
                anon += self._anonymous(process.pid)
            except psutil.Error:  # a child that just ended
                pass
        return rss, anon

    def _run(self) -> None:
        self.started = time.time()
        while not self._stop.is_set():
            self.samples.append((time.time() - self.started, *self._measure()))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max((rss for _, rss, _ in self.samples), default=0)

    @property
    def peak_anonymous(self) -> int:
        return max((anon for _, _, anon in self.samples), default=0)
