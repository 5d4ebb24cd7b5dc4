"""The fused routing kernels against the literal Procedure 1: the Triton ones
(capsbench/models/kernels/fused_routing.py) and the C++ ones for CPUs (capsbench/models/kernels/cpu_routing.py).

Without a GPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, which must
be set before Triton compiles anything, hence a subprocess); the CUDA versions of these checks
carry the ``gpu`` marker. The C++ kernels are built here with the machine's compiler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsbench.models import create_model
from capsbench.models.kernels import cpu_routing

ROOT = Path(__file__).resolve().parents[1]

# Runs in the interpreter: fused routing vs the literal procedure on odd shapes (no dimension
# a power of two, several tiles with ragged edges), then a small CapsNet with either kernel.
_INTERPRETER_CHECK = r"""
import json, sys, torch
sys.path.insert(0, "tests")
from test_models import _literal_routing
from capsbench.models import create_model
from capsbench.models.kernels.fused_routing import fused_routing

def err(a, b):
    return (a - b).abs().max().item()

out = {}
torch.manual_seed(0)
B, NI, K8, J, D = 18, 37, 3, 4, 5  # two batch tiles of 16: the W gradient is split
for r in (1, 2, 3):
    u = torch.randn(B, NI, K8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(NI, K8, J * D, dtype=torch.float64, requires_grad=True)
    v, c = fused_routing(u, W, J, r)
    g = torch.randn_like(v)
    gu, gW = torch.autograd.grad(v, (u, W), g)
    u_hat = torch.einsum("bik,ikn->bin", u, W).view(B, NI, J, D)  # (B, n_in, n_out, D)
    v_ref, c_ref = _literal_routing(u_hat, r)
    gu_ref, gW_ref = torch.autograd.grad(v_ref, (u, W), g)
    out[f"r{r}"] = [err(v, v_ref), err(c.transpose(1, 2), c_ref), err(gu, gu_ref), err(gW, gW_ref)]

kw = dict(conv1_channels=8, primary_caps=2)  # 72 primary capsules
m = {k: create_model("capsnet", routing_kernel=k, **kw).double().train() for k in ("triton", "torch")}
m["torch"].load_state_dict(m["triton"].state_dict())
x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
y = torch.tensor([3, 7])
res = {}
for k, model in m.items():
    o = model(x, y, keep_coupling=True)
    model.loss(o, x, y).backward()
    res[k] = (o.poses, o.coupling, [p.grad for p in model.parameters()])
out["model"] = [err(res["triton"][0], res["torch"][0]), err(res["triton"][1], res["torch"][1]),
                max(err(a, b) for a, b in zip(res["triton"][2], res["torch"][2]))]
print("RESULT", json.dumps(out))
"""


def test_fused_routing_matches_the_literal_procedure_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="Triton ships with PyTorch's CUDA builds; this build has none")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CAPSBENCH_ROUTING_TILES": "16,16,1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    errors = json.loads(line[len("RESULT "):])
    assert set(errors) == {"r1", "r2", "r3", "model"}
    for name, errs in errors.items():  # outputs, couplings, gradients (u and W, or every parameter)
        assert max(errs) < 1e-10, (name, errs)


def test_routing_kernel_choices_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="routing_kernel must be one of auto, torch, triton, cpp"):
        create_model("capsnet", routing_kernel="cuda")
    m = create_model("capsnet")
    u = torch.zeros(1, 1152, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CAPSBENCH_ROUTING", raising=False)
    assert cpu_routing.library() is not None, cpu_routing.build_error()  # the tests need a C++ compiler
    assert m.routing_impl(u) == "cpp" and m.uses_fused_routing(u)  # auto on a CPU: the C++ kernels
    assert m.routing_impl(u.to(torch.bfloat16)) == "torch"  # they take float32 and float64 only
    monkeypatch.setenv("CAPSBENCH_ROUTING", "torch")
    assert m.routing_impl(u) == "torch"
    monkeypatch.setenv("CAPSBENCH_ROUTING", "fast")
    with pytest.raises(ValueError, match="CAPSBENCH_ROUTING must be one of auto, torch, triton, cpp, got 'fast'"):
        m.uses_fused_routing(u)
    monkeypatch.delenv("CAPSBENCH_ROUTING")
    m.routing_kernel = "triton"
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA tensor.*routing_kernel='auto' or 'torch'"):
        m(torch.rand(1, 1, 28, 28))


def test_bad_tile_override_names_the_variable(monkeypatch):
    pytest.importorskip("triton")
    from capsbench.models.kernels.fused_routing import _tiles

    monkeypatch.setenv("CAPSBENCH_ROUTING_TILES", "16,16")
    with pytest.raises(ValueError, match=r"CAPSBENCH_ROUTING_TILES='16,16': expected 'BB,BK,warps\[,stages\]'"):
        _tiles()
    monkeypatch.setenv("CAPSBENCH_ROUTING_TILES", "16,12,4")
    with pytest.raises(ValueError, match="BK must be a power of two >= 16"):
        _tiles()


def _reference(u, W, J, r, g):
    """v, c (B, n_in, n_out) and the u / W gradients of the literal procedure, in float64."""
    from test_models import _literal_routing

    B, NI, _ = u.shape
    u_hat = torch.einsum("bik,ikn->bin", u, W).view(B, NI, J, -1)
    v_ref, c_ref = _literal_routing(u_hat, r)
    return (v_ref, c_ref, *torch.autograd.grad(v_ref, (u, W), g))


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 40, 8, 10, 16), (5, 23, 3, 4, 5)])  # the paper's capsules; odd sizes
def test_cpu_kernels_match_the_literal_procedure(r, shape):
    B, NI, K8, J, D = shape
    torch.manual_seed(r)
    u = torch.randn(B, NI, K8, dtype=torch.float64, requires_grad=True)
    W = (0.3 * torch.randn(NI, K8, J * D, dtype=torch.float64)).requires_grad_()
    g = torch.randn(B, J, D, dtype=torch.float64)
    refs = _reference(u, W, J, r, g)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        uc = u.detach().to(dtype).requires_grad_()
        Wc = W.detach().to(dtype).requires_grad_()
        v, c = cpu_routing.routing(uc, Wc, J, r)
        gu, gW = torch.autograd.grad(v, (uc, Wc), g.to(dtype))
        for got, ref in zip((v, c.transpose(1, 2), gu, gW), refs, strict=True):
            scale = max(1.0, ref.abs().max().item())  # float32: relative to the largest entry
            assert (got.double() - ref).abs().max().item() < tol * scale, (dtype, r)


def _capsnet_fused_vs_plain(kernel: str, dev: torch.device, batch: int):
    """One training forward/backward of CapsNet with routing_kernel ``kernel`` and with "torch"
    (same weights): both models and both outputs."""
    torch.manual_seed(0)
    fused = create_model("capsnet", routing_kernel=kernel).to(dev).train()
    plain = create_model("capsnet", routing_kernel="torch").to(dev).train()
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    outs = []
    for m in (fused, plain):
        o = m(x, y, keep_coupling=True)
        m.loss(o, x, y).backward()
        outs.append(o)
    return fused, plain, outs


def test_capsnet_with_the_cpu_kernels_matches_the_plain_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused, plain, outs = _capsnet_fused_vs_plain("cpp", torch.device("cpu"), 6)
    assert fused.routing_impl(torch.zeros(1, 1, 1)) == "cpp"
    assert (outs[0].poses - outs[1].poses).abs().max().item() < 1e-5
    assert (outs[0].coupling - outs[1].coupling).abs().max().item() < 1e-5
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        scale = b.grad.abs().max().item() + 1e-12
        assert (a.grad - b.grad).abs().max().item() < 1e-4 * scale, name


_NO_COMPILER = r"""
import sys, torch
from capsbench.cli.main import main
from capsbench.models import create_model
if sys.argv[1] == "model":
    m = create_model("capsnet")
    u = torch.zeros(1, 1152, 8)
    print("AUTO", m.routing_impl(u))
    m.routing_kernel = "cpp"
    try:
        m.routing_impl(u)
    except RuntimeError as e:
        print("ERROR", e)
else:
    sys.exit(main(["train", "--model", "capsnet", "--device", "cpu", "--out", sys.argv[1]]))
"""


def test_without_a_compiler_routing_falls_back_and_asking_for_cpp_is_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CAPSBENCH_ROUTING")}
    env.update(PATH=str(tmp_path / "empty"), CAPSBENCH_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _NO_COMPILER, "model"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "AUTO torch" in p.stdout, p.stdout + p.stderr[-2000:]
    assert "ERROR routing_kernel 'cpp' cannot run: the C++ library did not build: no C++ compiler found" in p.stdout
    p = subprocess.run([sys.executable, "-c", _NO_COMPILER, str(tmp_path / "out")], cwd=ROOT,
                       env={**env, "CAPSBENCH_ROUTING": "cpp"}, capture_output=True, text=True, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("capsbench: error: "), p.stderr[-2000:]
    assert "CAPSBENCH_ROUTING=cpp" in err[0] and "install a C++ compiler" in err[0], err[0]
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob("*.so"))


def test_a_damaged_cached_build_is_built_again(tmp_path):
    env = {**os.environ, "CAPSBENCH_CACHE": str(tmp_path),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = ("import torch; from capsbench.models import create_model; "
              "print('IMPL', create_model('capsnet').routing_impl(torch.zeros(1, 1152, 8)))")
    for damage in (False, True):
        if damage:
            for so in tmp_path.glob("*.so"):
                so.write_text("not a library")  # what a full disk or an interrupted copy leaves
        p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert "IMPL cpp" in p.stdout, p.stdout + p.stderr[-2000:]
    assert [so.stat().st_size > 1000 for so in tmp_path.glob("*.so")] == [True]


@pytest.mark.parametrize("env, argv, needles", [
    ({"CAPSBENCH_ROUTING": "fast"}, ["train", "--model", "capsnet", "--device", "cpu"],
     ["CAPSBENCH_ROUTING must be one of auto, torch, triton, cpp", "'fast'"]),
    ({"CAPSBENCH_ROUTING": "triton"}, ["train", "--model", "capsnet", "--device", "cpu"],
     ["need a CUDA device", "--device cpu"]),
    ({}, ["speed", "--routing", "triton", "--device", "cpu"], ["--routing triton", "need a CUDA device"]),
])
def test_routing_choices_are_checked_before_a_command_starts(env, argv, needles, monkeypatch, capsys, tmp_path):
    from capsbench.cli.main import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("capsbench: error: "), err
    assert all(n in err[0] for n in needles), err[0]
    assert not (tmp_path / "out").exists()  # nothing started


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tier needs a CUDA device")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 2, 3])
def test_fused_routing_on_cuda_matches_the_literal_procedure(r):
    from test_models import _literal_routing

    from capsbench.models.kernels.fused_routing import fused_routing

    dev = _cuda()
    torch.manual_seed(r)
    B, NI, J, D, K8 = 3, 70, 10, 16, 8
    u = torch.randn(B, NI, K8, dtype=torch.float64, requires_grad=True)
    W = (0.3 * torch.randn(NI, K8, J * D, dtype=torch.float64)).requires_grad_()
    g = torch.randn(B, J, D, dtype=torch.float64)
    u_hat = torch.einsum("bik,ikn->bin", u, W).view(B, NI, J, D)
    v_ref, c_ref = _literal_routing(u_hat, r)
    gu_ref, gW_ref = torch.autograd.grad(v_ref, (u, W), g)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        uc = u.detach().to(dev, dtype).requires_grad_()
        Wc = W.detach().to(dev, dtype).requires_grad_()
        v, c = fused_routing(uc, Wc, J, r)
        gu, gW = torch.autograd.grad(v, (uc, Wc), g.to(dev, dtype))
        for got, ref in ((v, v_ref), (c.transpose(1, 2), c_ref), (gu, gu_ref), (gW, gW_ref)):
            scale = max(1.0, ref.abs().max().item())  # float32: relative to the largest entry
            assert (got.double().cpu() - ref).abs().max().item() < tol * scale, (dtype, r)


@pytest.mark.gpu
def test_capsnet_on_cuda_with_the_fused_kernels_matches_the_plain_path():
    dev = _cuda()
    fused, plain, outs = _capsnet_fused_vs_plain("triton", dev, 32)
    assert fused.uses_fused_routing(torch.zeros(1, 1, 1, device=dev))
    assert (outs[0].poses - outs[1].poses).abs().max().item() < 1e-5
    assert (outs[0].coupling - outs[1].coupling).abs().max().item() < 1e-5
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        scale = b.grad.abs().max().item() + 1e-12
        assert (a.grad - b.grad).abs().max().item() < 1e-4 * scale, name


def test_cached_builds_unused_for_a_month_are_deleted_by_the_next_build(tmp_path, monkeypatch):
    """A new build deletes the other cached libraries that nothing loaded for STALE_AFTER_S; a
    load refreshes its file's time, so builds in use (another CPU sharing the home) stay."""
    import time

    from capsbench.models.kernels import cpu_routing

    monkeypatch.setenv("CAPSBENCH_CACHE", str(tmp_path))
    old, recent = tmp_path / "cpu_routing-0000000000000000.so", tmp_path / "cpu_routing-1111111111111111.so"
    other = tmp_path / "notes.txt"
    for f in (old, recent, other):
        f.write_text("x")
    month_ago = time.time() - cpu_routing.STALE_AFTER_S - 3600
    os.utime(old, (month_ago, month_ago))
    os.utime(other, (month_ago, month_ago))
    cpu_routing._build()  # compiles into the empty-of-this-version cache
    built = [p for p in tmp_path.glob("cpu_routing-*.so") if p not in (old, recent)]
    assert len(built) == 1 and not old.exists() and recent.exists() and other.exists()
    os.utime(built[0], (month_ago, month_ago))
    cpu_routing._build()  # loads the cached build: its time is refreshed, nothing is deleted
    assert built[0].stat().st_mtime > month_ago + 3600 and recent.exists()
