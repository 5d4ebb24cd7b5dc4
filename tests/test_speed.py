"""The speed options: bf16 autocast, channels_last, CUDA-graph steps, the learning curve and
``capsbench speed``. The CUDA-only ones carry the ``gpu`` marker (tox -e gpu) and fail, not
skip, without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from test_models import _literal_routing

from capsbench.errors import ConfigError
from capsbench.models import create_model
from capsbench.models.capsnet import dynamic_routing
from capsbench.perf.isa import isa_label
from capsbench.perf.speed import parse_variant, run_speed
from capsbench.train.config import TrainConfig
from capsbench.train.device import SpeedOptions
from capsbench.train.trainer import build_step, make_optimizer, train


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tier needs a CUDA device")
    return torch.device("cuda")


def test_bf16_autocast_keeps_capsules_and_routing_in_float32():
    torch.manual_seed(0)
    model = create_model("capsnet")
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    seen = {}
    model.route = (lambda f: lambda u, **kw: seen.setdefault("u", u) is not None and f(u, **kw))(model.route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
        loss = model.loss(out, x, y)
    assert model.conv1(x).dtype == torch.float32  # outside autocast: float32 again
    assert seen["u"].dtype == torch.float32 and out.poses.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():  # close to the float32 forward (bf16 convolutions: ~1e-2 relative)
        ref = model(x, y).poses
    assert (out.poses.detach() - ref).norm() / ref.norm() < 5e-2


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = create_model("capsnet")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out.poses, ref.poses, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.reconstruction, ref.reconstruction, atol=1e-5, rtol=1e-4)


def test_learning_curve_and_channels_last_training(tmp_path, data_root):
    # 256 images at batch 64: an epoch every 4 steps, so 12 steps give 3 curve points
    cfg = TrainConfig(model="lenet5", profile="smoke", steps=12, batch_size=64, train_limit=256)
    a = train(cfg, out=tmp_path / "a", data_root=data_root, device="cpu", progress=False, log=lambda m: None,
              speed=SpeedOptions(channels_last=True, curve=True))
    curve = [h for h in a.history if "val_acc" in h]
    assert [h["step"] for h in curve] == [4, 8, 12] and [h["epoch"] for h in curve] == [1, 2, 3]
    assert all(0.0 <= h["val_acc"] <= 1.0 for h in curve)
    b = train(cfg, out=tmp_path / "b", data_root=data_root, device="cpu", progress=False, log=lambda m: None)
    assert not [h for h in b.history if "val_acc" in h]
    for (k, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-3, msg=k)  # layout does not change the job


def test_cuda_only_speed_options_are_refused_on_the_cpu():
    for opts in (SpeedOptions(cuda_graph=True), SpeedOptions(compile=True)):
        with pytest.raises(ConfigError, match="CUDA"):
            opts.check(torch.device("cpu"))


def test_speed_bench_on_the_cpu(data_root):
    rows = run_speed("capsnet", ["fp32", "fp32_cl", "bf16_cl_graph"], [4], torch.device("cpu"), data_root=data_root,
                     budget_s=0.05, infer_batch=8, log=lambda m: None)
    ok, ok_cl, refused = rows
    for r in (ok, ok_cl):
        assert r["images_per_s_train"] > 0 and r["images_per_s_inference"] > 0
        assert 0 < r["routing_share"] < 1 and r["batch_size"] == 4 and r["routing"] == "cpp"
        assert r["conv_impl"] == r["conv_impl_inference"] == "direct"  # batches 4 and 8: too small for the FFT path
        assert r["isa"] == isa_label()  # the instruction set the row ran with (avx512, avx2, ...)
    assert parse_variant("fp32_cl") == {"bf16": False, "channels_last": True, "graph": False, "compile": False}
    assert "needs a CUDA device" in refused["error"]  # a row with the reason, not a crash


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 3])
def test_fast_routing_on_cuda_matches_the_literal_procedure(r):
    dev = _cuda()
    torch.manual_seed(r)
    u = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    v_ref, _ = _literal_routing(u, r)
    g = torch.randn_like(v_ref)
    (g_ref,) = torch.autograd.grad(v_ref, u, g)
    uc = u.detach().to(dev).requires_grad_()
    v, _ = dynamic_routing(uc.permute(0, 2, 1, 3).contiguous(), r)
    (g_fast,) = torch.autograd.grad(v, uc, g.to(dev))
    torch.testing.assert_close(v.cpu(), v_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_fast.cpu(), g_ref, atol=1e-5, rtol=0)
    # float32 at the model's real size against float64 on the CPU
    u32 = torch.randn(8, 10, 1152, 16, device=dev) * 0.05
    v32, _ = dynamic_routing(u32, 3)
    v64, _ = dynamic_routing(u32.double().cpu(), 3)
    assert (v32.double().cpu() - v64).norm() / v64.norm() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_a_cuda_graph_step_equals_an_eager_step(bf16):
    dev = _cuda()
    torch.backends.cudnn.deterministic = True
    try:
        torch.manual_seed(0)
        x = torch.rand(16, 1, 28, 28, device=dev)
        y = torch.randint(0, 10, (16,), device=dev)
        models = [create_model("capsnet").to(dev) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        start = {k: v.clone() for k, v in models[0].state_dict().items()}
        opts = [make_optimizer(m, 1e-3, dev, capturable=c) for m, c in zip(models, (False, True), strict=True)]
        for g in opts[1].param_groups:
            g["lr"] = torch.tensor(1e-3, device=dev)
        eager = build_step(models[0], opts[0], dev, bf16, SpeedOptions(), x, y)
        graph = build_step(models[1], opts[1], dev, bf16, SpeedOptions(cuda_graph=True), x, y)
        for k, v in models[1].state_dict().items():  # the capture's warm-up steps were undone
            assert torch.equal(v, start[k]), k
        for _ in range(3):
            xi, yi = torch.rand_like(x), torch.randint(0, 10, (16,), device=dev)
            le, _ = eager(xi, yi)
            lg, _ = graph(xi, yi)
            torch.testing.assert_close(lg, le, atol=1e-4, rtol=1e-3)
        for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=k)
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.gpu
def test_cuda_graph_training_follows_the_eager_job(tmp_path, data_root):
    _cuda()
    # quick profile: the rate falls linearly to 0 over the 12 steps, so a graph that missed the
    # schedule would move the weights about twice as far. 200 images at batch 64: every 4th
    # step is a short batch of 8, which runs eagerly beside the graph.
    cfg = TrainConfig(model="capsnet", profile="quick", steps=12, batch_size=64, train_limit=200)
    kw = dict(data_root=data_root, device="cuda", progress=False, log=lambda m: None)
    g = train(cfg, out=tmp_path / "g", speed=SpeedOptions(channels_last=True, cuda_graph=True, curve=True), **kw)
    e = train(cfg, out=tmp_path / "e", **kw)
    assert g.steps_done == 12 and [h["step"] for h in g.history if "val_acc" in h] == [4, 8, 12]
    torch.manual_seed(0)
    w0 = create_model("capsnet").state_dict()
    we, wg = e.model.state_dict(), g.model.state_dict()
    moved = sum((we[k].cpu() - w0[k]).norm() ** 2 for k in w0) ** 0.5
    apart = sum((wg[k] - we[k]).norm() ** 2 for k in w0) ** 0.5
    assert apart < 0.1 * moved, (apart, moved)


def test_a_suite_runs_with_speed_options_and_records_them(tmp_path, data_root):
    import json

    from capsbench.evaluation.run import run_suite

    run_dir = run_suite("part_shuffle", models=["lenet5"], profile="smoke", device="cpu", out=tmp_path,
                        data_root=data_root, progress=False, log=lambda m: None,
                        speed=SpeedOptions(channels_last=True))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["speed_options"]["channels_last"] and meta["amp"] is None and meta["status"] == "finished"
    with pytest.raises(ConfigError, match="CUDA"):
        run_suite("part_shuffle", models=["lenet5"], profile="smoke", device="cpu", out=tmp_path / "b",
                  data_root=data_root, progress=False, log=lambda m: None, amp="bf16")
    assert not (tmp_path / "b").exists()  # refused before anything was created


def test_channels_last_is_on_by_default_on_cpus_only_where_a_model_asks_for_it():
    from capsbench.train.device import channels_last_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name, on_cpu in (("efficientnet_b0", True), ("lenet5", True), ("cnn_maxpool", False), ("capsnet", False)):
        m = create_model(name)
        assert channels_last_for(m, cpu) is on_cpu, name
        assert channels_last_for(m, cuda) is False, name  # GPUs: only when asked (--channels-last)
        assert channels_last_for(m, cpu, requested=False) is False and channels_last_for(m, cuda, requested=True)


def test_the_default_memory_format_trains_and_predicts_the_same_model(tmp_path, data_root):
    """lenet5 on the CPU: NHWC by default (recorded in job.json), NCHW with --no-channels-last.
    The same arithmetic in another order: after 5 steps the weights agree to float32 rounding
    (Adam amplifies it later on: 1e-3 after 20 steps), and both models score the test images
    alike (predict feeds inputs in the weights' layout); a job reloaded from its checkpoint on
    the CPU is NHWC again."""
    import json

    from capsbench.data.fetch import ensure_dataset
    from capsbench.train.device import _in_channels_last, predict, to_float
    from capsbench.train.jobs import load_finished

    cfg = TrainConfig(model="lenet5", steps=5, batch_size=32, train_limit=640, seed=3)
    kw = dict(data_root=data_root, device="cpu", progress=False, log=lambda m: None)
    a = train(cfg, out=tmp_path / "a", **kw)
    b = train(cfg, out=tmp_path / "b", speed=SpeedOptions(channels_last=False), **kw)
    assert _in_channels_last(a.model) and not _in_channels_last(b.model)
    assert json.loads((a.job_dir / "job.json").read_text())["channels_last"] is True
    assert json.loads((b.job_dir / "job.json").read_text())["channels_last"] is False
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert (sa[k] - sb[k]).abs().max() < 1e-5, k
    x = to_float(ensure_dataset("mnist", root=data_root, split="test").images[:200])
    pa, pb = predict(a.model, x)[0], predict(b.model, x)[0]
    torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4)
    assert (pa.argmax(1) == pb.argmax(1)).float().mean() > 0.99
    reloaded = load_finished(cfg, tmp_path / "b", "cpu")
    assert _in_channels_last(reloaded.model)
    torch.testing.assert_close(predict(reloaded.model, x)[0], pb, rtol=1e-4, atol=1e-4)
