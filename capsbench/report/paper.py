"""The paper's published numbers, as data, for reports to show beside ours.

Source: Sara Sabour, Nicholas Frosst and Geoffrey E. Hinton, "Dynamic Routing Between
Capsules", Advances in Neural Information Processing Systems 30 (NIPS 2017);
arXiv:1710.09829.

* Table 1: MNIST test error (%), mean and standard deviation over 3 trials, for the
  baseline CNN and CapsNet with 1 or 3 routing iterations, with or without the
  reconstruction regulariser (Section 5).
* Section 5: parameter counts: baseline 35.4M, CapsNet 8.2M (6.8M without the
  reconstruction subnetwork).
* Section 5.2: robustness to affine transformations: trained on randomly placed MNIST on
  a 40x40 canvas, CapsNet and a traditional CNN (max-pooling and dropout) reach 99.23% and
  99.22% on the expanded MNIST test set, and 79% and 66% on affNIST.

The numbers were checked against secondary copies of the paper's text (a section-by-section
summary of the paper reproducing Table 1; reading notes quoting Section 5.2 with its
99.23 / 99.22 / 79 / 66 table; an implementation quoting "CapsNet has 8.2M parameters and
6.8M parameters without the reconstruction subnetwork"; Table 2 of Mazzia et al. 2021,
"Efficient-CapsNet", Sci. Rep., which lists the baseline at 35,400K parameters and 0.39%).
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = (
    "Sabour, S., Frosst, N. & Hinton, G. E. (2017). Dynamic Routing Between Capsules. "
    "Advances in Neural Information Processing Systems 30 (NIPS 2017). arXiv:1710.09829."
)
ARXIV_URL = "https://arxiv.org/abs/1710.09829"


@dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1 (MNIST test error in %, 3 trials)."""

    method: str
    routing: int | None
    reconstruction: bool | None
    test_error: float
    test_error_std: float | None  # None where the paper gives no spread (the baseline)
    params_millions: float | None
    our_model: str | None  # the capsbench model that implements this row, if any


TABLE1: tuple[Table1Row, ...] = (
    Table1Row("Baseline", None, None, 0.39, None, 35.4, "cnn_sabour"),
    Table1Row("CapsNet", 1, False, 0.34, 0.032, 6.8, None),
    Table1Row("CapsNet", 1, True, 0.29, 0.011, 8.2, "capsnet_r1"),
    Table1Row("CapsNet", 3, False, 0.35, 0.036, 6.8, "capsnet_norecon"),
    Table1Row("CapsNet", 3, True, 0.25, 0.005, 8.2, "capsnet"),
)
TABLE1_TRIALS = 3

PARAMS_MILLIONS = {"baseline": 35.4, "capsnet": 8.2, "capsnet_without_reconstruction": 6.8}


@dataclass(frozen=True)
class AffnistRow:
    """Section 5.2: accuracy (%) on the expanded MNIST test set and on affNIST."""

    method: str
    expanded_mnist_accuracy: float
    affnist_accuracy: float
    our_model: str


AFFNIST: tuple[AffnistRow, ...] = (
    AffnistRow("CapsNet", 99.23, 79.0, "capsnet"),
    AffnistRow("traditional CNN (max-pooling, dropout)", 99.22, 66.0, "cnn_maxpool"),
)
AFFNIST_CAPSNET = 0.79
AFFNIST_CNN = 0.66


def table1_for_model(model: str) -> Table1Row | None:
    """The Table 1 row a capsbench model reproduces (None if it has none)."""
    for row in TABLE1:
        if row.our_model == model:
            return row
    return None


def describe_table1_row(row: Table1Row) -> str:
    if row.routing is None:
        return row.method
    recon = "with" if row.reconstruction else "no"
    return f"{row.method}, routing {row.routing}, {recon} reconstruction"


__all__ = [
    "AFFNIST",
    "AFFNIST_CAPSNET",
    "AFFNIST_CNN",
    "ARXIV_URL",
    "CITATION",
    "PARAMS_MILLIONS",
    "TABLE1",
    "TABLE1_TRIALS",
    "AffnistRow",
    "Table1Row",
    "describe_table1_row",
    "table1_for_model",
]
