"""A shard dies with its coordinator (Linux): the kernel SIGKILLs it when the parent exits.

Otherwise a shard outlives a SIGKILLed coordinator, holding its memory (a GPU's, which
blocks the restart). The shard sets this up itself, first thing, rather than in a
``preexec_fn`` of the coordinator: forking a process whose gRPC threads are live and running
Python between fork and exec can abort the child.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when ``parent_pid`` (its parent) exits."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
