"""What the data sets are: their files, checksums and folders (:data:`DATASETS`), and where the
data root is (:func:`resolve_data_root`: ``--data-root``, ``$CAPSBENCH_DATA``, ``./datasets``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from capsbench.errors import ConfigError, DataError

DATA_ENV = "CAPSBENCH_DATA"
"""Environment variable that points at the data root (the CLI's ``--data-root`` wins)."""

DEFAULT_ROOT = "datasets"
"""Data root used when neither an explicit root nor ``CAPSBENCH_DATA`` is given."""

SPLITS: tuple[str, ...] = ("train", "test")


def _fix_hint(spec: DatasetSpec | None = None) -> str:
    """Return the sentence every "data not found" message ends with."""
    folder = spec.folder if spec else "MNIST"
    name = spec.name if spec else "mnist"
    return (
        "point the data root at local files with --data-root PATH or "
        f"{DATA_ENV}=PATH (torchvision layout <root>/{folder}/raw/*.gz), "
        f"or run 'capsbench data fetch {name}' when online"
    )


def _damaged_hint(spec: DatasetSpec) -> str:
    """Return the sentence every "this data file is damaged" message ends with."""
    return (
        "delete it and copy a good one in its place, or run "
        f"'capsbench data fetch {spec.name}' when online"
    )


def _with_damaged_hint(err: DataError, spec: DatasetSpec) -> DataError:
    msg = str(err)
    if "delete the file" in msg or "delete it" in msg:  # already says what to do
        return err
    return DataError(f"{msg}; {_damaged_hint(spec)}")


# --------------------------------------------------------------------------------------------
# Data root
# --------------------------------------------------------------------------------------------


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the data root as an absolute path.

    Args:
        root: An explicit root (e.g. from ``--data-root``). When ``None`` or empty, the
            ``CAPSBENCH_DATA`` environment variable is used, and when that is unset or empty,
            ``./datasets`` relative to the current directory.

    Returns:
        The absolute path. Existence is not checked here: callers that read files report a
        missing root with a message about the files they needed.
    """
    if root is None or str(root) == "":
        root = os.environ.get(DATA_ENV) or DEFAULT_ROOT
    # abspath rather than resolve(): keep symlinked roots as the user wrote them, so the
    # paths recorded in metadata are the ones they recognise.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


# --------------------------------------------------------------------------------------------
# Dataset specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's files are called, how big they are and how to check them.

    Attributes:
        name: Canonical name (``"mnist"``, ``"fashion_mnist"``).
        display_name: Name for messages (``"MNIST"``, ``"Fashion-MNIST"``).
        folder: Folder under the data root, as torchvision names it.
        files: ``{"train": (images_file, labels_file), "test": (...)}`` (gzip names).
        counts: Number of samples per split.
        image_shape: ``(rows, cols)`` of one image.
        num_classes: Number of classes.
        class_names: Human-readable class names, indexed by label.
        mirrors: Base URLs tried in turn by :func:`fetch_dataset` (torchvision's list).
        md5: Official md5 of each ``.gz`` file (torchvision's values).
        content_sha256: Known-good sha256 of each file's *uncompressed* content, or ``None``
            where no trusted value is known. Lets a recompressed copy be recognised.
        known_variants: md5 of a known non-official ``.gz`` -> a note for the warning.
    """

    name: str
    display_name: str
    folder: str
    files: Mapping[str, tuple[str, str]]
    counts: Mapping[str, int]
    image_shape: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...]
    md5: Mapping[str, str]
    content_sha256: Mapping[str, str | None]
    known_variants: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def filenames(self, split: str | None = None) -> list[str]:
        """Return the expected file names of one split, or of both when ``split`` is None."""
        splits = SPLITS if split is None else (split,)
        return [f for s in splits for f in self.files[s]]

    def raw_dir(self, root: str | os.PathLike[str] | None = None) -> Path:
        """Return ``<root>/<folder>/raw`` for the resolved data root."""
        return resolve_data_root(root) / self.folder / "raw"


def _ro(d: dict[str, Any]) -> Mapping[str, Any]:
    # Specs are shared module-level constants; a read-only view stops one caller from
    # silently changing what another one checks against.
    return MappingProxyType(dict(d))


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        display_name="MNIST",
        folder="MNIST",
        files=_ro(_IDX_FILES),
        counts=_ro({"train": 60000, "test": 10000}),
        image_shape=(28, 28),
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5=_ro(
            {
                "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
            }
        ),
        # Computed once from the copies in /work/shared/data/MNIST/raw, whose .gz md5s equal
        # the official ones above (so these are the official contents); they also match the
        # values that folder's README lists. The official train-images content hash is not
        # known here (the only local copy is a reconstruction), hence None.
        content_sha256=_ro(
            {
                "train-images-idx3-ubyte.gz": None,
                "train-labels-idx1-ubyte.gz": (
                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
                ),
                "t10k-images-idx3-ubyte.gz": (
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
                ),
                "t10k-labels-idx1-ubyte.gz": (
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
                ),
            }
        ),
        known_variants=_ro(
            {
                # The shared offline copy: rebuilt from a PNG copy of MNIST; every pixel is
                # within 1 gray level of the official file (see /work/shared/data/README.md).
                "a0800b9e8c812b9e45b911451b965316": (
                    "known reconstruction of the official file (pixels within 1 gray level; "
                    "mean 33.331 vs 33.318)"
                ),
            }
        ),
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        display_name="Fashion-MNIST",
        folder="FashionMNIST",
        files=_ro(_IDX_FILES),
        counts=_ro({"train": 60000, "test": 10000}),
        image_shape=(28, 28),
        num_classes=10,
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5=_ro(
            {
                "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
            }
        ),
        # Upstream contents, from /work/shared/data/README.md (Debian's recompressed copy
        # decompresses to exactly these bytes).
        content_sha256=_ro(
            {
                "train-images-idx3-ubyte.gz": (
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
                ),
                "train-labels-idx1-ubyte.gz": (
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
                ),
                "t10k-images-idx3-ubyte.gz": (
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
                ),
                "t10k-labels-idx1-ubyte.gz": (
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
                ),
            }
        ),
    ),
}

_ALIASES = {"mnist": "mnist", "fashionmnist": "fashion_mnist"}


def canonical_name(name: str) -> str:
    """Map a dataset name or alias to its key in :data:`DATASETS`.

    ``"MNIST"``, ``"fashion-mnist"``, ``"FashionMNIST"`` and ``"fashion_mnist"`` are all
    accepted (case, ``-`` and ``_`` are ignored), because users type what torchvision and the
    papers call them.

    Raises:
        ConfigError: The name is not a known dataset.
    """
    key = re.sub(r"[-_\s]", "", str(name)).lower()
    if key in _ALIASES:
        return _ALIASES[key]
    known = ", ".join(sorted(DATASETS))
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {known}")


def _check_split(split: str) -> str:
    s = str(split).lower()
    if s not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return s
