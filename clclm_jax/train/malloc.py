"""glibc malloc settings that keep freed memory, so a CPU train step does not page-fault its buffers every call.

XLA:CPU allocates an executable's temporaries afresh on each call (2.2 GB for a SmolLM2 4x256 LoRA step).
glibc serves allocations that large with mmap, or trims them off the heap top, and hands them back to the
kernel on free, so the next step faults every page in again: ~600k faults and 1.5 s of kernel time per step,
16% of its wall time on a 2-core host. One heap (arena) that never trims and never mmaps keeps the pages.
The variables must be in place when the process starts, hence a re-exec from the entry points.
"""

import os
import platform
import sys

KEEP_FREED = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
OPT_OUT = "CLCLM_SYSTEM_MALLOC"


def needs_reexec(environ: dict[str, str]) -> bool:
  """True on Linux with glibc when the settings are not yet in `environ` and `OPT_OUT` is not set."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or environ.get(OPT_OUT):
    return False
  return any(environ.get(k) != v for k, v in KEEP_FREED.items())


def reexec_keeping_freed_memory() -> None:
  """Re-executes this command line once with `KEEP_FREED` in the environment (set CLCLM_SYSTEM_MALLOC=1 to
  skip). Call only from a `__main__` block, before any work is done."""
  if needs_reexec(dict(os.environ)):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **KEEP_FREED})
