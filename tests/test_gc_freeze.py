"""Start-up objects frozen out of garbage collection: what the helper does, in a process of its own
(freezing the test process would keep every later test's garbage cycles among its objects)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc, weakref
from lightllm_grpc.gc_freeze import freeze_startup_objects

class Node:
    pass

kept = [Node() for _ in range(1000)]  # lives for good, as a model does
cycle = Node(); cycle.me = cycle; dead = weakref.ref(cycle); del cycle  # start-up garbage
gc.disable()  # only the helper's own collection may free the cycle
frozen = freeze_startup_objects("test")
assert dead() is None, "garbage was frozen instead of collected"
assert frozen == gc.get_freeze_count() >= len(kept), (frozen, gc.get_freeze_count())
tracked = {id(o) for o in gc.get_objects()}
assert not any(id(n) in tracked for n in kept), "frozen objects are still scanned"
later = Node(); later.me = later
assert any(o is later for o in gc.get_objects()), "objects made after the freeze must be collected"
print("ok")
"""


def test_freeze_collects_first_then_keeps_startup_objects_out_of_collections() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
