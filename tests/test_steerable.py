"""The C8 steerable CNN (e2cnn): invariant to quarter turns by construction, trains, names its
optional dependency when it is missing, and takes 28x28 only."""

from __future__ import annotations

import sys

import pytest
import torch

from capsbench import ConfigError, create_model
from capsbench.cli.main import main
from capsbench.models import count_parameters
from capsbench.train.config import TrainConfig


def test_quarter_turns_leave_its_scores_unchanged():
    torch.manual_seed(0)
    m = create_model("steerable_c8").eval()  # float32: e2cnn caches its bases across models, so no .double()
    x = torch.rand(3, 1, 29, 29)  # the padded input: its centre is a pixel
    with torch.no_grad():
        f = m.invariant_features(x)
        for k in (1, 2, 3):
            torch.testing.assert_close(m.invariant_features(torch.rot90(x, k, (2, 3))), f, rtol=1e-4, atol=1e-5)
        # a transposed image is a reflection, which C8 is not built for: a control that the check can fail
        assert (m.invariant_features(x.transpose(2, 3)) - f).abs().max() > 1e-3


def test_size_and_a_training_step():
    m = create_model("steerable_c8")
    assert count_parameters(m) == 82_026
    assert m.family == "cnn"
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    losses = []
    for _ in range(5):
        loss = m.loss(m(x), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_other_input_sizes_are_refused():
    with pytest.raises(ConfigError, match="28x28"):
        create_model("steerable_c8", input_size=40)
    with pytest.raises(ConfigError, match="takes 28x28 inputs"):
        TrainConfig(model="steerable_c8", protocol="canvas40_random").validate()


def test_without_e2cnn_one_line_names_the_extra(monkeypatch, tmp_path, capsys, data_root):
    monkeypatch.setitem(sys.modules, "e2cnn", None)  # as if it were not installed: import fails
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[equivariant\]'"):
        TrainConfig(model="steerable_c8").validate()
    with pytest.raises(ConfigError, match=r"\[equivariant\]"):
        create_model("steerable_c8")
    rc = main(["run", "--suite", "rotation", "--models", "steerable_c8", "--profile", "smoke",
               "--out", str(tmp_path), "--data-root", str(data_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "[equivariant]" in err[0], err
    assert not (tmp_path / "jobs").exists()


def test_weights_load_whichever_mode_saved_or_loads_them():
    # e2cnn caches expanded filters as buffers in eval mode; a checkpoint must not depend on it
    torch.manual_seed(1)
    a = create_model("steerable_c8")
    x = torch.rand(4, 1, 28, 28)
    a.train()
    a(x)  # moves the batch-norm statistics away from their initial values
    saved_in_train = a.state_dict()
    a.eval()
    saved_in_eval = a.state_dict()
    assert saved_in_train.keys() == saved_in_eval.keys()
    with torch.no_grad():
        want = a(x).scores
        for sd, eval_first in ((saved_in_train, True), (saved_in_eval, False), (saved_in_train, False)):
            b = create_model("steerable_c8")
            if eval_first:
                b.eval()
            b.load_state_dict(sd)
            b.eval()
            torch.testing.assert_close(b(x).scores, want)
