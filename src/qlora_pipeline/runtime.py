"""Process-wide performance settings that have to be made before the heavy work starts."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    A CPU training step allocates and frees the same large buffers (the logits of a 32k
    vocabulary are tens of MB) every step. glibc serves blocks above 128 KiB with mmap and
    unmaps them on free, so each step pays page faults and zeroing again: on 2 cores that is
    about 20% of the step time, spent in the kernel. Raising both thresholds to 1 GiB keeps
    those pages mapped. No-op where glibc is not the allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """Whole CPUs granted by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), rounded up; None when there is no quota or no cgroup file."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` (and llama-cpp-python's default, half of it) counts the host's cores; in
    a container, such as a Space on "CPU basic" (2 vCPUs), that can be many more than the
    process gets, and llama.cpp then runs more threads than it has cores, which is slower.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    return max(1, min(count, quota) if quota else count)


def usable_memory(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes of memory this process may use: the cgroup limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) where one is set, else the machine's MemTotal; None if unknown.
    A Space on "CPU basic" is a container with a 16 GB limit on a larger host."""
    limit = None
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (root / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            limit = int(text)
            break
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        total = None
    return min(v for v in (limit, total) if v) if (limit or total) else None
