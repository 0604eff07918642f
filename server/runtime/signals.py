"""Signals in Ray actor processes the server starts (stage actors, replicas).

A Ray worker's main thread sits in Ray's C++ task loop, so the Python handler Ray installs
for SIGTERM never runs: a `kill` of a stage actor or a replica was ignored silently, the
server serving on as if nothing happened. `exit_on_signal` makes such a process exit
instead: the C-level handler still writes the signal's number to a wakeup fd, whatever
the main thread is doing, and a thread reading it ends the process. The server then sees
what it sees for any dead actor (a stage: the engine's death, exit 1; a replica: it leaves
routing and Ray restarts it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_ON_SIGNAL = 128 + signal.SIGTERM  # the shell's code for "ended by SIGTERM"


def exit_on_signal(what: str) -> bool:
    """Call on the process's main thread (an actor's __init__ runs there); returns whether
    the watcher was installed (False off the main thread, or where wakeup fds are not)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        return False
    # The C handler writes to the fd only for signals that have a Python handler: keep Ray's
    # (or set one) for SIGTERM, and ignore none.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGTERM, lambda *_: None)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if signal.SIGTERM in data:
                print(f"lockstep: {what} (pid {os.getpid()}) got SIGTERM; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_ON_SIGNAL)

    threading.Thread(target=watch, name="lockstep-signals", daemon=True).start()
    return True
