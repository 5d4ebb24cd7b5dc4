"""Keep freed memory in the process: glibc's malloc settings for CPU training.

A CapsNet training step on a CPU allocates and frees a few hundred MB of large tensors
(u_hat, the convolutions' spectra, their gradients). glibc serves every block above its
mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and unmaps it on ``free``,
so each step the kernel maps and zero-fills those pages again: on the 2-core build machine
that page-fault work was about 40% of the batch-100 step (1.26 s -> 0.72 s per step with
the settings below, docs/performance.md). :func:`keep_freed_memory` asks malloc (``mallopt(3)``)
to serve large blocks from its heap and not to give freed memory back to the system, so the
next step reuses pages that are already mapped. The price is memory: the process keeps what it
freed until it exits, and its heap settles somewhat above the peak of live tensors (aligned
blocks fragment it for the first few steps). A batch-100 CapsNet step on the build machine:
peak RSS 1.46 GB with glibc's defaults, 1.59 GB with these settings, no page faults after the
sixth step (240,000 per step before).

Process-wide and harmless to correctness; it is applied by the CLI, the training runner and
the speed benchmarks, and recorded in every run's environment (``malloc``). Set
``CAPSBENCH_MALLOC=system`` to leave glibc's defaults alone. Elsewhere than glibc (macOS,
Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from capsbench.errors import ConfigError

MALLOC_CHOICES = ("keep", "system")
# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_BIG = 2**31 - 1  # an int: mallopt takes one

_state: dict[str, object] | None = None


def malloc_choice() -> str:
    """``CAPSBENCH_MALLOC`` ("keep", the default, or "system"); a ConfigError names a bad value."""
    value = os.environ.get("CAPSBENCH_MALLOC") or "keep"
    if value not in MALLOC_CHOICES:
        raise ConfigError(f"CAPSBENCH_MALLOC={value!r}: expected one of {', '.join(MALLOC_CHOICES)} "
                          "(keep: reuse freed memory, the default; system: glibc's own settings)")
    return value


def keep_freed_memory() -> dict[str, object]:
    """Apply the settings once per process; return what is in force (for run metadata).

    Raises ConfigError for a bad ``CAPSBENCH_MALLOC``.

    Example:
        >>> keep_freed_memory()["mode"] in ("keep", "system", "unsupported")
        True
    """
    global _state
    choice = malloc_choice()  # checked on every call: the CLI relies on it for a clear error
    if _state is not None:  # already applied in this process (settings are not undone)
        return dict(_state)
    if choice == "system":
        _state = {"mode": "system"}
        return dict(_state)
    libc = _glibc()
    if libc is None:
        _state = {"mode": "unsupported", "reason": f"not glibc ({platform.system()} {platform.libc_ver()[0] or ''})".strip()}
        return dict(_state)
    state: dict[str, object] = {"mode": "keep", "trim_threshold": _BIG}
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _BIG) == 1
    if libc.mallopt(_M_MMAP_THRESHOLD, _BIG) == 1:
        state["mmap_threshold"] = _BIG
    else:  # a glibc that caps the threshold (32 MiB): no mmap-served blocks at all
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and ok
        state["mmap_max"] = 0
    if not ok:
        state = {"mode": "unsupported", "reason": "mallopt refused the settings"}
    _state = state
    return dict(_state)


def malloc_state() -> dict[str, object]:
    """What :func:`keep_freed_memory` set in this process, without changing anything."""
    return dict(_state) if _state is not None else {"mode": "not applied"}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


__all__ = ["MALLOC_CHOICES", "keep_freed_memory", "malloc_choice", "malloc_state"]
