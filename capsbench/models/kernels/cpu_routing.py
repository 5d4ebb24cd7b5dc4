"""Dynamic routing fused with the DigitCaps predictions, for CPUs (a small C++ library).

The plain path (:func:`capsbench.models.capsnet.dynamic_routing`) writes u_hat = W^T u once
(B x 10 x 1152 x 16 floats, 74 MB at batch 100) and reads it back in every routing pass,
forward and backward; on a CPU that memory traffic is what routing costs. ``cpu_routing.cpp``
never stores u_hat: each pass walks the input capsules, recomputes their u_hat rows while the
capsule's weights sit in the L1 cache, and uses them at once (one pass per routing iteration
forward, one per iteration and one for the u / W gradients backward). The algebra is that of
routing.route_passes / route_backward_terms, in float32 or float64; results agree with the
literal Procedure 1 (tests/test_fused_routing.py) to float32 rounding.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``, with OpenMP where the compiler has it) into a per-user cache
(``$CAPSBENCH_CACHE``, else ``~/.cache/capsbench``), keyed by the source, the compiler, the
CPU and the instruction set it is built for (``-march=native``, or x86-64-v3 under
``CAPSBENCH_CPU_ISA=avx2``: perf/isa.py), so each machine builds it once (about 3 s). The
code is portable C++ (no intrinsics; the compiler vectorises it for the target); flags a
compiler lacks are dropped in turn. Without a compiler :func:`available` is False
and CapsNet routes with the plain path; :func:`why_not` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from capsbench.models.kernels.fused_routing import routing_shapes
from capsbench.perf.isa import march

SOURCE = Path(__file__).with_name("cpu_routing.cpp")
ABI = 2
# Builds of other source versions, compilers or CPUs stay in the cache until unused this long
# (each load refreshes its file's time), then the next build deletes them.
STALE_AFTER_S = 30 * 86400
# The run-time variant keeps per-row buffers of this many values on the stack (the .cpp's kMaxDim).
MAX_DIM = 64

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    text = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return text


def cache_dir() -> Path:
    root = os.environ.get("CAPSBENCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "capsbench"


def _flags(openmp: bool, tuned: bool) -> list[str]:
    """Compiler flags; ``tuned`` adds -march (x86) / -mcpu (ARM) for this CPU, or for the
    instruction set CAPSBENCH_CPU_ISA caps it at (perf/isa.py: x86-64-v3 for avx2)."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast"]
    machine = platform.machine().lower()
    if tuned and machine in ("x86_64", "amd64"):
        flags.append(f"-march={march()}")
    elif tuned and machine in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    if openmp:
        flags.append("-fopenmp")
    return flags


def _compile(cxx: str, target: Path) -> list[str]:
    """Build the library at ``target``; returns the flags that worked. Each flag a compiler may
    lack is dropped in turn (Apple's clang has no -fopenmp: one thread then; an old or foreign
    compiler may not know -march=x86-64-v3 or -mcpu=native: portable code then)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for tuned, openmp in ((True, True), (True, False), (False, True), (False, False)):
        flags = _flags(openmp, tuned)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            p = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(out)],
                               capture_output=True, text=True, timeout=300)
            if p.returncode == 0:
                os.replace(out, target)  # atomic: parallel workers may build at once
                return flags
            errors.append(" ".join(p.stderr.split())[:300])  # one line: it ends up in CLI errors
    raise RuntimeError(f"{cxx} could not compile {SOURCE.name}: {errors[0]}")


def _prune(keep: Path) -> None:
    """Delete the cached builds other than ``keep`` that no process has loaded for STALE_AFTER_S."""
    cutoff = time.time() - STALE_AFTER_S
    for old in keep.parent.glob("cpu_routing-*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # another process got there first, or a read-only cache
            pass


def _load_cached(target: Path) -> ctypes.CDLL | None:
    """The cached build at ``target``, its file time refreshed (in use: not stale); None where
    there is none, or a damaged one (a full disk, a copied home), which is deleted."""
    if not target.exists():
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        target.unlink(missing_ok=True)
        return None
    try:
        os.utime(target)
    except OSError:  # a read-only cache
        pass
    return lib


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + version.encode() + _cpu_key().encode() + march().encode()
                         + str(ABI).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_routing-{key}.so"
    lib = _load_cached(target)
    if lib is None:
        _compile(cxx, target)
        lib = ctypes.CDLL(str(target))
        _prune(target)
    if lib.capsbench_routing_abi() != ABI:
        raise RuntimeError(f"{target} is stale; delete it")
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for prefix in ("capsbench_f32", "capsbench_f64"):
        getattr(lib, prefix + "_forward").argtypes = [ptr] * 2 + [i64] * 3 + [i32] * 3 + [ptr] * 3 + [i32]
        getattr(lib, prefix + "_backward").argtypes = [ptr] * 6 + [i64] * 3 + [i32] * 3 + [ptr] * 2 + [i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None where that failed (see build_error)."""
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _error = str(e)
    return _lib


def build_error() -> str | None:
    """Why the library is not available (None if it is, or has not been tried yet)."""
    return _error


def why_not(u: torch.Tensor, W: torch.Tensor | None = None, n_out: int | None = None) -> str | None:
    """Why the kernels cannot run on ``u`` (and ``W``), or None if they can (builds the library)."""
    if u.device.type != "cpu":
        return f"they take CPU tensors, got a {u.device.type} tensor"
    if u.dtype not in (torch.float32, torch.float64):
        return f"they take float32 or float64, got {u.dtype}"
    d_out = W.shape[-1] // n_out if W is not None and n_out else 0
    if max(u.shape[-1], d_out) > MAX_DIM:
        return f"capsule sizes {u.shape[-1]} -> {d_out}: at most {MAX_DIM}"
    if library() is None:
        return f"the C++ library did not build: {build_error()}"
    return None


def available(u: torch.Tensor, W: torch.Tensor | None = None, n_out: int | None = None) -> bool:
    """Whether the kernels can run on ``u`` (and ``W``): CPU, float32/64, capsules up to MAX_DIM."""
    return why_not(u, W, n_out) is None


class _Shapes:
    def __init__(self, u: torch.Tensor, W: torch.Tensor, n_out: int):
        # sizes beyond MAX_DIM were turned away by why_not in routing()
        self.B, self.NI, self.K8, self.J, self.D = routing_shapes(u, W, n_out)
        self.prefix = "capsbench_f32" if u.dtype == torch.float32 else "capsbench_f64"
        self.threads = torch.get_num_threads()


def _fn(sh: _Shapes, op: str):
    return getattr(library(), f"{sh.prefix}_{op}")


class _CpuRouting(torch.autograd.Function):
    """capsnet.dynamic_routing of u_hat = W^T u, forward and backward each one library call."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, W: torch.Tensor, n_out: int, iterations: int):
        sh = _Shapes(u, W, n_out)
        u = u.transpose(0, 1).contiguous()  # (NI, B, K8): each input capsule's batch in one block
        W = W.contiguous()
        r = iterations
        s_all = u.new_empty(r, sh.B, sh.J, sh.D)  # s_t and v_t of every iteration
        v_all = torch.empty_like(s_all)
        c_all = u.new_empty(max(r - 1, 1), sh.NI, sh.J, sh.B)  # couplings of iterations 1 .. r-1, input-major
        _fn(sh, "forward")(u.data_ptr(), W.data_ptr(), sh.B, sh.NI, sh.J, r, sh.K8, sh.D,
                           s_all.data_ptr(), v_all.data_ptr(), c_all.data_ptr(), sh.threads)
        ctx.sh, ctx.iterations = sh, r
        ctx.save_for_backward(u, W, s_all, v_all, c_all)
        c_last = c_all[r - 2].permute(2, 1, 0) if r > 1 else u.new_full((sh.B, sh.J, sh.NI), 1.0 / sh.J)
        ctx.mark_non_differentiable(c_last)
        return v_all[r - 1].clone(), c_last

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, _grad_c):
        sh, r = ctx.sh, ctx.iterations
        u, W, s_all, v_all, c_all = ctx.saved_tensors
        grad_v = grad_v.contiguous()
        gu = torch.empty_like(u)
        gw = torch.empty_like(W)
        _fn(sh, "backward")(u.data_ptr(), W.data_ptr(), grad_v.data_ptr(), s_all.data_ptr(), v_all.data_ptr(),
                            c_all.data_ptr(), sh.B, sh.NI, sh.J, r, sh.K8, sh.D, gu.data_ptr(), gw.data_ptr(),
                            sh.threads)
        return gu.transpose(0, 1), gw, None, None


@torch.compiler.disable  # Dynamo does not trace into the library: a graph break, same result
def routing(u: torch.Tensor, W: torch.Tensor, n_out: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of primary capsules ``u`` (B, n_in, d_in) through ``W`` (n_in, d_in, n_out*d_out).

    Returns v (B, n_out, d_out) and the last coupling coefficients (B, n_out, n_in), as
    :func:`capsbench.models.capsnet.dynamic_routing` does for u_hat = W^T u.
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    if u.dtype != W.dtype:
        raise ValueError(f"u ({u.dtype}) and W ({W.dtype}) must have the same dtype")
    reason = why_not(u, W, n_out)
    if reason is not None:
        raise RuntimeError(f"the CPU routing kernels cannot run: {reason}; use CapsNet(routing_kernel='torch')")
    return _CpuRouting.apply(u, W, n_out, iterations)
