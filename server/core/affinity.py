"""CPU affinity of the engine core and the front end (`--core-cpus`), and the core's
priority (`--core-nice`).

Linux sets affinity and niceness per thread: `pin_process` and `lower_process` set them for
every thread a process has (/proc/self/task) and so for those it starts later, which
inherit them."""

from __future__ import annotations

import os

from scheduler.errors import SpecError

# The engine core's default niceness (`--core-nice`): measured side by side with 0 in six
# runs of bench/peer_vllm.py's loads and four of bench/soak.py (BENCHMARKS.md, "Twenty-first
# session: the engine core below its front end").
CORE_NICE = 10


def parse_cpus(text: str) -> tuple[int, ...]:
    """'0', '0,2', '0-3' -> sorted CPU ids; '' -> (). Every id must be one this process may
    run on, and at least one must be left for the front end."""
    if not text.strip():
        return ()
    cpus = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise SpecError(f"--core-cpus: {part.strip()!r} is not a CPU id or range like 0-3") from None
        if first > last:
            raise SpecError(f"--core-cpus: empty range {part.strip()!r}")
        cpus.update(range(first, last + 1))
    allowed = available()
    if not cpus <= allowed:
        raise SpecError(f"--core-cpus: CPUs {sorted(cpus - allowed)} are not among this process's {sorted(allowed)}")
    if not allowed - cpus:
        raise SpecError(f"--core-cpus: {sorted(cpus)} leaves no CPU of {sorted(allowed)} for the front end")
    return tuple(sorted(cpus))


def available() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _each_thread(set_one) -> None:
    """Calls `set_one(tid)` for every thread of this process (/proc/self/task)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            set_one(int(tid))
        except (ProcessLookupError, PermissionError):
            pass  # a thread that just ended


def lower_process(nice: int) -> None:
    """Every thread of this process `nice` lower (threads started later inherit it; Linux
    sets niceness per thread, and os.nice() would lower the calling thread alone)."""
    _each_thread(lambda tid: os.setpriority(os.PRIO_PROCESS, tid,
                                            min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)))


def pin_process(cpus) -> None:
    """Every thread of this process onto `cpus` (threads started later inherit it)."""
    _each_thread(lambda tid: os.sched_setaffinity(tid, cpus))
