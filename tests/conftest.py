"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from capsbench.data.specs import DATASETS, resolve_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root the tests read real MNIST from.

    Fails (rather than skips) when MNIST is absent: tests on the real data are the point, and
    a silently skipped suite would look green without having checked anything.
    """
    root = resolve_data_root()
    raw = root / "MNIST" / "raw"
    missing = [f for f in DATASETS["mnist"].filenames() if not (raw / f).is_file()]
    if missing:
        pytest.fail(
            f"MNIST not found under {raw} (missing {', '.join(missing)}); set CAPSBENCH_DATA "
            "to a folder in torchvision layout (e.g. CAPSBENCH_DATA=../shared/data) or put "
            "the files under ./datasets/MNIST/raw/",
            pytrace=False,
        )
    return root


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Honour CAPSBENCH_THREADS (as the CLI does) so tests can share a busy machine."""
    before = torch.get_num_threads()
    if os.environ.get("CAPSBENCH_THREADS"):
        torch.set_num_threads(int(os.environ["CAPSBENCH_THREADS"]))
    yield
    torch.set_num_threads(before)
