"""The one memory sampler (rehearsal and bench): it sees memory a child process really holds."""

from __future__ import annotations

import subprocess
import sys

from qlora_pipeline.memory import MemorySampler

HOLD_200MB = "import time; block = bytearray(200_000_000); block[::4096] = b'x' * len(block[::4096]); time.sleep(1.5)"


def test_the_children_of_this_process_are_sampled():
    with MemorySampler(interval=0.05) as memory:
        subprocess.run([sys.executable, "-c", HOLD_200MB], check=True)
    assert memory.peak_anonymous >= 190_000_000 and memory.peak >= memory.peak_anonymous


def test_one_process_by_pid_is_sampled_until_it_ends():
    child = subprocess.Popen([sys.executable, "-c", HOLD_200MB])
    with MemorySampler(interval=0.05, pid=child.pid) as memory:
        child.wait()
    assert memory.peak_anonymous >= 190_000_000
    assert len(memory.samples) > 10  # sampled all along, not once
