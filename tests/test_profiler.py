"""capsbench.perf.profiler and ``capsbench profile``: FLOP counts against hand counts, the stage
split on synthetic events, and a tiny profile end to end (fast; fine with CAPSBENCH_THREADS=1).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from capsbench.cli.main import main
from capsbench.errors import ConfigError
from capsbench.models import create_model
from capsbench.models.capsnet import dynamic_routing
from capsbench.perf.flops import count_flops, routing_flops, routing_flops_for
from capsbench.perf.profiler import ProfileRows, format_table, profile_models, write_profile
from capsbench.perf.stages import split_stage_times

# --------------------------------------------------------------------------- FLOPs


def test_capsnet_flops_per_image():
    model = create_model("capsnet")
    train, by_op = count_flops(model, train=True)
    # 1.197 GFLOP of matmul + convolution work per image in a training step (optimizer excluded)
    assert abs(train / 1.197e9 - 1) < 0.02, train
    # by hand: conv1 2*256*400*81, primary 2*256*36*256*81, u_hat 2*1152*8*160,
    # routing 2*(4*10*1152*16), decoder 2*(160*512 + 512*1024 + 1024*784)
    inference, _ = count_flops(model, train=False)
    assert inference == 16_588_800 + 382_205_952 + 2_949_120 + 1_474_560 + 2_818_048
    # backward: conv1 weight grad only (the image needs no gradient), both grads elsewhere,
    # routing's hand-written backward 2*(9*10*1152*16)
    assert train == inference + 16_588_800 + 2 * (382_205_952 + 2_949_120 + 2_818_048) + 3_317_760
    assert set(by_op) >= {"aten.convolution", "aten.convolution_backward", "aten.bmm"}
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("r", [1, 3])
def test_flop_counter_sees_the_custom_routing_backward(r):
    # _DynamicRouting is an autograd.Function whose backward calls torch.matmul: the dispatch
    # mode must count those. Per image: forward 2(r-1) products of J*n_in*D multiply-adds,
    # backward 2(r-1) more plus one with inner size 2r-1: J*n_in*D*(6r-5) in all.
    B, J, n, D = 2, 10, 1152, 16
    u_hat = torch.randn(B, J, n, D).mul_(0.05).requires_grad_()
    with FlopCounterMode(display=False) as fc:
        v, _ = dynamic_routing(u_hat, r)
        v.sum().backward()
    assert fc.get_total_flops() == 2 * B * J * n * D * (6 * r - 5)


def test_lenet5_flops_equal_hand_count():
    model = create_model("lenet5")
    macs = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    inference, _ = count_flops(model, train=False)
    assert inference == 2 * macs == 833_040
    train, _ = count_flops(model, train=True)
    # backward: conv1 weight grad only; conv2 and the three linears both grads
    assert train == 2 * macs + 2 * (6 * 28 * 28 * 25) + 4 * (macs - 6 * 28 * 28 * 25)


def test_grouped_conv_backward_counted_once_per_group():
    # torch's formula counts a depthwise conv's weight gradient C times over; ours does not
    from torch import nn

    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(1, 32, 1)
            self.dw = nn.Conv2d(32, 32, 3, groups=32)
            self.fc = nn.Linear(32 * 6 * 6, 10)

        def forward(self, x, y=None):
            from capsbench.models.base import ModelOutput

            return ModelOutput(scores=self.fc(self.dw(self.pw(x)).flatten(1)))

        def loss(self, out, x, y):
            return torch.nn.functional.cross_entropy(out.scores, y)

    model = Depthwise()
    model.input_size = 8
    pw, dw, fc = 2 * 32 * 64, 2 * 32 * 36 * 9, 2 * 1152 * 10
    assert count_flops(model, train=False)[0] == pw + dw + fc
    assert count_flops(model, train=True)[0] == (pw + dw + fc) + pw + 2 * dw + 2 * fc
    effnet = create_model("efficientnet_b0")
    inference, train = count_flops(effnet, train=False)[0], count_flops(effnet, train=True)[0]
    assert 2 * inference < train < 3 * inference


def test_routing_flops_formula():
    values = [routing_flops(r) for r in (1, 2, 3, 5)]
    assert values == sorted(values) and len(set(values)) == 4
    assert routing_flops(1) == 2 * 1152 * 8 * 160 + 2 * 1152 * 160 + (6 * 160 + 4 * 10) == 3_318_760
    assert routing_flops(3) == 4_910_520 and routing_flops(3, train=True) == 14_495_160
    # each extra iteration adds the same work
    assert routing_flops(5) - routing_flops(3) == 2 * (routing_flops(2) - routing_flops(1))
    for r in (1, 3):
        assert routing_flops(r, train=True) > 2 * routing_flops(r)
    assert routing_flops_for(create_model("capsnet")) == routing_flops(3)
    assert routing_flops_for(create_model("capsnet", routing_iters=1), train=True) == routing_flops(1, train=True)
    assert routing_flops_for(create_model("lenet5")) is None
    with pytest.raises(ValueError):
        routing_flops(0)


# --------------------------------------------------------------------------- stages


def test_split_stage_times_on_synthetic_events():
    fwd = [("forward", "conv", 1.0), ("forward", "pool", 2.0), ("forward", "conv", 4.0),
           ("forward", "pool", 5.0), ("forward", "fc", 6.0)]
    bwd = [("backward", "fc", 8.0), ("backward", "pool", 9.0), ("backward", "conv", 10.0),
           ("backward", "pool", 12.0), ("backward", "conv", 13.0)]
    d = split_stage_times(fwd + bwd, t_start=0.0, t_loss=7.0, t_backward_end=15.0)
    assert d == {
        ("conv", "forward"): 1.0 + 2.0, ("pool", "forward"): 1.0 + 1.0, ("fc", "forward"): 1.0,
        ("other", "forward"): 1.0, ("other", "backward"): 1.0, ("fc", "backward"): 1.0,
        ("pool", "backward"): 1.0 + 1.0, ("conv", "backward"): 2.0 + 2.0,
    }
    assert sum(d.values()) == 15.0


# --------------------------------------------------------------------------- a tiny profile

EVERY_METRIC = {
    "params", "flops_inference", "flops_train_step",
    "time_inference_s", "iqr_inference_s", "images_per_s_inference",
    "time_train_step_s", "iqr_train_step_s", "images_per_s_train",
    "peak_rss_process_bytes", "peak_rss_increase_bytes",
    "stage_time_s", "stage_share", "instrumented_step_time_s",
}
CAPSULE_METRICS = {"routing_flops_inference", "routing_flops_train", "routing_share"}


@pytest.fixture(scope="module")
def tiny():
    import time

    t0 = time.perf_counter()
    rows = profile_models(["lenet5", "capsnet"], [2], [1, 3], device="cpu", repeats=3)
    return rows, time.perf_counter() - t0


def test_tiny_profile_rows(tiny):
    rows, wall = tiny
    print(f"tiny profile: {wall:.1f} s")
    assert isinstance(rows, ProfileRows) and rows.meta["settings"]["stage_batch_size"] == 2
    df = pd.DataFrame(rows)
    assert (df["error"] == "").all(), df.loc[df["error"] != "", ["model", "cell", "metric", "error"]]
    assert (df[["suite", "seed", "profile", "dtype"]].drop_duplicates().values.tolist()
            == [["profile", 0, "profile", "float32"]])
    configs = {("lenet5", None): set(), ("capsnet", 3): set(), ("capsnet", 1): set()}
    for key in configs:
        model, r = key
        sel = df[(df.model == model) & (df.routing_iters.isna() if r is None else df.routing_iters == r)]
        want = EVERY_METRIC | (CAPSULE_METRICS if r is not None else set())
        assert set(sel.metric) == want, (key, want ^ set(sel.metric))
        timed = sel[sel.metric.str.startswith("time_")]
        assert len(timed) == 2 and (timed.value > 0).all() and (timed.n == 3).all()
        assert (sel[sel.metric.str.startswith("images_per_s")].value > 0).all()
        assert set(sel[sel.metric.str.startswith("time_")].cell) == {"bs2" + (f"-r{r}" if r else "")}
        shares = sel[(sel.metric == "stage_share") & (sel["pass"] == "total")]
        assert abs(shares.value.sum() - 1) < 0.1, shares
        assert (shares.value >= 0).all() and shares.stage.is_unique
        stage_times = sel[sel.metric == "stage_time_s"]
        assert (stage_times.value >= 0).all()
        if r is not None:
            assert set(shares.stage) == {"conv1", "primary_caps", "u_hat", "routing", "decoder", "other"}
            rs = sel[sel.metric == "routing_share"].value.item()
            assert 0 < rs < 1
        else:
            assert set(shares.stage) == {"conv", "pool", "fc", "other"}  # two conv stages summed
            assert (sel[sel.metric == "routing_flops_train"]).empty
    flops = df[df.metric == "flops_train_step"].set_index("routing_iters", drop=False)
    caps = flops[flops.model == "capsnet"]
    assert caps.loc[1.0, "value"] < caps.loc[3.0, "value"]
    table = format_table(rows)
    assert "capsnet (r3)" in table and "capsnet (r1)" in table and "lenet5" in table


def test_write_profile(tiny, tmp_path):
    rows, _ = tiny
    run_dir = write_profile(rows, tmp_path)
    assert run_dir == (tmp_path / "profile-cpu").resolve()
    df = pd.read_csv(run_dir / "results.csv", keep_default_na=False)
    assert list(df.columns[:14]) == ["run_id", "suite", "model", "seed", "train_data", "eval_data", "transform",
                                     "cell", "batch_size", "routing_iters", "stage", "pass", "metric", "value"]
    assert len(df) == len(rows)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["settings"]["routing_iters"] == [1, 3] and meta["environment"]["torch"] == torch.__version__
    assert "aten.bmm" in meta["flops_by_op"]["capsnet r3"]["flops_train_step"]
    assert meta["channels_last"] == {"capsnet": False, "lenet5": True}  # as the runner trains them on a CPU
    # "auto": each model's own choice, which at batch 2 is the direct convolution for CapsNet
    assert meta["settings"]["routing"] == meta["settings"]["conv_impl"] == "auto"
    ran = meta["implementations"]
    assert set(ran) == {"capsnet r1", "capsnet r3"}  # LeNet-5 has neither choice
    for mode in ("train", "inference"):
        used = ran["capsnet r3"]["bs2-r3"][mode]
        assert used["conv"] == "direct" and used["routing"] in ("cpp", "torch"), used


def test_cli_profile_writes_results(tmp_path, capsys):
    rc = main(["profile", "--models", "lenet5", "--batch-sizes", "1,2", "--repeats", "3", "--device", "cpu",
               "--out", str(tmp_path), "--trace"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "results.csv" in out
    df = pd.read_csv(tmp_path / "profile-cpu" / "results.csv", keep_default_na=False)
    assert {"time_train_step_s", "images_per_s_inference", "flops_train_step", "stage_share"} <= set(df.metric)
    assert set(df[df.metric == "time_train_step_s"].cell) == {"bs1", "bs2"}
    assert (df.error == "").all()
    meta = json.loads((tmp_path / "profile-cpu" / "run.json").read_text())
    assert meta["status"] == "complete" and meta["command"].startswith("capsbench")
    assert not math.isnan(meta["wall_time_s"])
    # the chrome trace of one training step shows the stages as record_function ranges
    (trace,) = meta["traces"]
    names = {e.get("name") for e in json.loads(open(trace).read())["traceEvents"]}
    assert {"capsbench.forward:conv", "capsbench.forward:pool", "capsbench.forward:fc", "capsbench.forward:other",
            "capsbench.backward:fc", "capsbench.backward:conv", "capsbench.optimizer"} <= names


def test_cli_profile_times_the_implementations_asked_for(tmp_path, capsys):
    """--conv / --routing pick CapsNet's convolution path and routing kernel (and the pooling
    CNN's convolution) for every timed configuration; run.json says what ran."""
    rc = main(["profile", "--models", "capsnet,cnn_maxpool", "--batch-sizes", "2", "--routing-iters", "3",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--conv", "fft", "--routing", "torch",
               "--out", str(tmp_path)])
    assert rc == 0
    assert "routing torch, conv fft" in capsys.readouterr().err
    meta = json.loads((tmp_path / "profile-cpu" / "run.json").read_text())
    assert meta["settings"]["routing"] == "torch" and meta["settings"]["conv_impl"] == "fft"
    for mode in ("train", "inference"):
        assert meta["implementations"]["capsnet r3"]["bs2-r3"][mode] == {"routing": "torch", "conv": "fft"}
        assert meta["implementations"]["cnn_maxpool"]["bs2"][mode] == {"conv": "fft"}
    df = pd.read_csv(tmp_path / "profile-cpu" / "results.csv", keep_default_na=False)
    assert (df.error == "").all()


def test_profile_rejects_an_unknown_implementation():
    with pytest.raises(ConfigError, match="conv_impl must be one of auto, direct, fft, got 'fast'"):
        profile_models(["lenet5"], [1], device="cpu", conv_impl="fast")
    with pytest.raises(ConfigError, match="routing must be one of"):
        profile_models(["lenet5"], [1], device="cpu", routing="cuda")


def test_cli_profile_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--batch-sizes", "0,32", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert main(["profile", "--models", "nope", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
