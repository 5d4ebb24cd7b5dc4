"""The accuracy bars of the quick profile (tox -e slow; about 30 minutes on 2 cores)."""

from __future__ import annotations

import pytest

from capsbench.train.config import TrainConfig
from capsbench.train.jobs import evaluate_clean
from capsbench.train.trainer import train

BARS = {"capsnet": 0.985, "cnn_maxpool": 0.985, "lenet5": 0.975, "efficientnet_b0": 0.95}


@pytest.mark.slow
@pytest.mark.parametrize("model,bar", sorted(BARS.items()))
def test_quick_profile_reaches_the_bar_on_clean_mnist(model, bar, data_root, tmp_path):
    res = train(TrainConfig(model=model, profile="quick"), out=tmp_path, data_root=data_root, device="cpu",
                progress=False)
    clean = evaluate_clean(res, data_root=data_root)
    assert clean["n"] == 10_000
    assert clean["accuracy"] >= bar, (model, clean)
