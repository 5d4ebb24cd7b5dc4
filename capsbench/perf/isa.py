"""Which SIMD instruction set the CPU code runs with, and a switch to run as an older CPU would.

Most researchers' CPUs have no AVX-512 (AMD before Zen 4, most laptops; Apple silicon has
NEON). To measure what they get on a machine that has it, set ``CAPSBENCH_CPU_ISA=avx2``
before capsbench loads torch (the CLI reads it first; in Python, before ``import torch``).
:func:`apply_limit` then caps each part of the stack at that instruction set:

- ATen's own vectorised kernels: ``ATEN_CPU_CAPABILITY`` (``torch.backends.cpu.get_cpu_capability()``
  reports the result);
- oneDNN (convolutions, matrix products): ``ONEDNN_MAX_CPU_ISA``;
- MKL (FFTs, BLAS where torch uses it): ``MKL_ENABLE_INSTRUCTIONS``;
- capsbench's C++ routing kernel: compiled for ``-march=x86-64-v3`` (AVX2 + FMA) instead of
  ``-march=native`` (models/kernels/cpu_routing.py).

A variable the user set already wins over the limit. :func:`isa_info` is what run.json,
job.json and every speed row record.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

ENV = "CAPSBENCH_CPU_ISA"
# limit -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, -march for the C++ kernel)
LIMITS: dict[str, tuple[str, str, str, str]] = {
    "avx2": ("avx2", "AVX2", "AVX2", "x86-64-v3"),
    "avx512": ("avx512", "AVX512_CORE", "AVX512", "x86-64-v4"),
}


def requested() -> str | None:
    """The limit asked for in ``CAPSBENCH_CPU_ISA`` (lower case), None for none or ``native``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in LIMITS:
        from capsbench.errors import ConfigError

        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not an instruction-set limit: "
                          f"use one of {', '.join(LIMITS)} or native")
    return value


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def apply_limit() -> str | None:
    """Cap torch, oneDNN, MKL (and the C++ kernel's build) at the requested instruction set.

    Must run before torch is imported; returns the limit applied (None for none). A limit on
    a CPU that is not x86 is ignored (the variables only name x86 instruction sets).
    """
    limit = requested()
    if limit is None or not _x86():
        return None
    aten, onednn, mkl, _ = LIMITS[limit]
    if "torch" in sys.modules:
        from capsbench.errors import ConfigError

        raise ConfigError(f"{ENV}={limit} must be set before torch is imported (it was already): "
                          "set it in the environment of the command, or before 'import torch'")
    os.environ.setdefault("ATEN_CPU_CAPABILITY", aten)
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", onednn)
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", mkl)
    return limit


def march() -> str:
    """The ``-march``/``-mcpu`` value the C++ routing kernel is built for."""
    limit = requested()
    if _x86():
        return LIMITS[limit][3] if limit else "native"
    return "native"


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model from platform only
        pass
    return model, flags


def hardware_isa(flags: set[str] | None = None) -> str:
    """The widest SIMD set this CPU offers: avx512, avx2, avx, sse4 (x86), neon/sve (ARM), or unknown."""
    if flags is None:
        flags = _cpuinfo()[1]
    if not flags:
        return "neon" if platform.machine().lower() in ("arm64", "aarch64") else "unknown"
    for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sse4", "sse4_2"),
                      ("sve", "sve"), ("neon", "asimd")):
        if flag in flags:
            return isa
    return "unknown"


def isa_info() -> dict[str, Any]:
    """The CPU's own instruction set, the limit asked for, and what torch, oneDNN and MKL were told."""
    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu_model": model,
        "hardware": hardware_isa(flags),
        "limit": requested() or "native",
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
        "routing_kernel_march": march(),
    }
    if "torch" in sys.modules:
        import torch

        info["aten"] = torch.backends.cpu.get_cpu_capability()
    return info


def isa_label(info: dict[str, Any] | None = None) -> str:
    """One word for tables: the instruction set the run used (``avx2`` on an AVX-512 CPU capped at AVX2)."""
    info = info or isa_info()
    return info["limit"] if info["limit"] != "native" else info["hardware"]
