"""Instruction sets: CAPSBENCH_CPU_ISA=avx2 caps torch, oneDNN, MKL and the C++ routing kernel at
AVX2; the kernel builds and is right for AVX2 only, and falls back where a compiler lacks a flag;
every run records what it ran with."""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from capsbench.errors import ConfigError
from capsbench.perf import isa

ROOT = Path(__file__).resolve().parents[1]
X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and "avx2" in isa._cpuinfo()[1]

# Builds the routing library in a fresh cache and checks it against the literal procedure
# (float64, forward and both gradients); prints what torch reports and the library's path.
_CHECK = r"""
import sys
from capsbench.perf.isa import apply_limit, isa_info
apply_limit()
import torch
sys.path.insert(0, sys.argv[1])
from test_fused_routing import _reference
from capsbench.models.kernels import cpu_routing
torch.manual_seed(0)
u = torch.randn(3, 40, 8, dtype=torch.float64, requires_grad=True)
W = (0.3 * torch.randn(40, 8, 10 * 16, dtype=torch.float64)).requires_grad_()
g = torch.randn(3, 10, 16, dtype=torch.float64)
refs = _reference(u, W, 10, 3, g)
uc, Wc = u.detach().requires_grad_(), W.detach().requires_grad_()
v, c = cpu_routing.routing(uc, Wc, 10, 3)
got = (v, c.transpose(1, 2), *torch.autograd.grad(v, (uc, Wc), g))
err = max((a - b).abs().max().item() for a, b in zip(got, refs))
print("ATEN", torch.backends.cpu.get_cpu_capability())
print("ERR", err)
print("INFO", __import__("json").dumps(isa_info()))
print("LIB", cpu_routing.library()._name)
"""


def _run(tmp_path: Path, **env: str) -> tuple[dict[str, str], subprocess.CompletedProcess]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("CAPSBENCH_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    full.update(CAPSBENCH_CACHE=str(tmp_path / "cache"),
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    p = subprocess.run([sys.executable, "-c", _CHECK, str(ROOT / "tests")], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line), p


def _has_avx512(lib: str) -> bool:
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True,
                         timeout=120).stdout
    assert "vfmadd" in asm or "vmul" in asm, "the disassembly shows no vector code at all"
    return "%zmm" in asm


@pytest.mark.skipif(not X86_AVX2, reason="AVX2 exists only on x86 CPUs that have it")
def test_avx2_limit_caps_torch_and_builds_the_kernel_without_avx512(tmp_path):
    out, _ = _run(tmp_path, CAPSBENCH_CPU_ISA="avx2")
    assert out["ATEN"] == "AVX2"
    assert float(out["ERR"]) < 1e-10
    info = json.loads(out["INFO"])
    assert info["limit"] == "avx2" and info["aten"] == "AVX2" and info["onednn_max_cpu_isa"] == "AVX2"
    assert info["mkl_enable_instructions"] == "AVX2" and info["routing_kernel_march"] == "x86-64-v3"
    assert isa.isa_label(info) == "avx2"
    if os.path.exists("/usr/bin/objdump"):
        assert not _has_avx512(out["LIB"])
        if isa.hardware_isa() == "avx512":  # the native build is cached apart and is right too
            native, _ = _run(tmp_path)
            assert native["LIB"] != out["LIB"]  # a separate build (GCC may still prefer 256-bit vectors in it)
            assert float(native["ERR"]) < 1e-10 and json.loads(native["INFO"])["limit"] == "native"


def test_a_compiler_without_the_tuning_and_openmp_flags_still_builds_a_correct_kernel(tmp_path):
    """A compiler that rejects -march / -mcpu and -fopenmp (an old one, Apple's clang): portable code."""
    real = next(shutil.which(p) for p in (os.environ.get("CXX"), "c++", "g++", "clang++") if p and shutil.which(p))
    wrapper = tmp_path / "picky-c++"
    log = tmp_path / "calls.log"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'for a in "$@"; do case "$a" in -march=*|-mcpu=*|-fopenmp) '
        'echo "picky-c++: unknown flag $a" >&2; exit 1;; esac; done\n'
        f'exec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    out, _ = _run(tmp_path, CXX=str(wrapper))
    assert float(out["ERR"]) < 1e-10
    calls = [c for c in log.read_text().splitlines() if c != "--version"]
    assert len(calls) == 4 and "-fopenmp" not in calls[-1] and "-march" not in calls[-1]


def test_bad_limit_is_one_line_and_a_late_limit_is_refused(tmp_path, monkeypatch):
    env = {**os.environ, "CAPSBENCH_CPU_ISA": "avx3",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "capsbench", "list", "models"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "CAPSBENCH_CPU_ISA='avx3'" in err[0] and "avx2" in err[0]
    monkeypatch.setenv("CAPSBENCH_CPU_ISA", "avx2")
    if isa._x86():
        import torch  # noqa: F401  (already imported by the test session: too late to cap it)

        with pytest.raises(ConfigError, match="before torch is imported"):
            isa.apply_limit()


@pytest.mark.parametrize("flags, expected", [
    ({"sse4_2", "avx", "avx2", "avx512f"}, "avx512"), ({"sse4_2", "avx", "avx2", "fma"}, "avx2"),
    ({"sse4_2", "avx"}, "avx"), ({"fp", "asimd"}, "neon"), ({"fp", "asimd", "sve"}, "sve"),
])
def test_hardware_instruction_set_from_cpu_flags(flags, expected):
    assert isa.hardware_isa(flags) == expected


def test_run_metadata_and_speed_rows_record_the_instruction_set():
    from capsbench.store import environment_info

    info = environment_info("cpu")["cpu_isa"]
    assert info["hardware"] == isa.hardware_isa() and info["limit"] in ("native", *isa.LIMITS)
    assert info["aten"] == __import__("torch").backends.cpu.get_cpu_capability()
