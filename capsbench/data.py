"""MNIST, Fashion-MNIST and affNIST: finding, checking, reading and fetching the files.

The data lives under a *data root* in torchvision's layout (``<root>/MNIST/raw/*.gz``,
``<root>/FashionMNIST/raw/*.gz``, plus ``<root>/affNIST/`` for the real affNIST files), so a
folder that torchvision already filled works as is. The root is, in order: an explicit
argument (the CLI's ``--data-root``), the ``CAPSBENCH_DATA`` environment variable, or
``./datasets``.

Everything a user can get wrong here (a missing folder, a truncated download, a file that is
not what its name says) raises :class:`~capsbench.errors.DataError` with a message that names
the file, what was expected and what was found. Files whose checksums match no known-good
copy still load, with a :class:`DataWarning`, because a faithful-but-different copy (such as
a recompressed archive) is common and should not stop a run; the checksum of every file is
recorded in the run's metadata so such runs stay traceable. Such files are also checked the
way the loader checks them (gzip, IDX magic, dimensions, counts, labels) wherever they are
only hashed, so ``capsbench data info`` shows a damaged one as ``damaged`` and
:func:`fetch_dataset` replaces it.

Example:
    >>> ds = load_dataset("mnist", "test")          # doctest: +SKIP
    >>> ds.images.shape, ds.labels.dtype            # doctest: +SKIP
    (torch.Size([10000, 28, 28]), torch.int64)
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import re
import socket
import struct
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch

from capsbench.errors import ConfigError, DataError

__all__ = [
    "AFFNIST_FOLDER",
    "AFFNIST_SHAPE",
    "DATASETS",
    "DATA_ENV",
    "DataWarning",
    "Dataset",
    "DatasetSpec",
    "FileInfo",
    "affnist_columns_to_images",
    "canonical_name",
    "clear_cache",
    "data_checksums",
    "data_info",
    "ensure_dataset",
    "fetch_dataset",
    "file_info",
    "find_affnist",
    "load_affnist_test",
    "load_dataset",
    "read_affnist_mat",
    "read_idx",
    "resolve_data_root",
]

DATA_ENV = "CAPSBENCH_DATA"
"""Environment variable that points at the data root (the CLI's ``--data-root`` wins)."""

DEFAULT_ROOT = "datasets"
"""Data root used when neither an explicit root nor ``CAPSBENCH_DATA`` is given."""

AFFNIST_FOLDER = "affNIST"
AFFNIST_SHAPE = (40, 40)

SPLITS: tuple[str, ...] = ("train", "test")

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of
# dimensions. We only ever expect uint8 images (3 dims) and uint8 labels (1 dim).
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
_IDX_NDIM = {"images": 3, "labels": 1}
_GZIP_MAGIC = b"\x1f\x8b"

# Exceptions that gzip/zlib raise on truncated or corrupt input; all of them mean "this file
# is damaged", which the user must hear as a DataError rather than a traceback.
_GZIP_ERRORS = (OSError, EOFError, zlib.error, ValueError, struct.error)


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


# --------------------------------------------------------------------------------------------
# IDX reading
# --------------------------------------------------------------------------------------------


def _describe_start(raw: bytes) -> str:
    if not raw:
        return "an empty file"
    return f"{len(raw)} bytes starting with 0x{raw[:4].hex()}"


def _check_file(path: Path) -> None:
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise DataError(f"{path}: expected a data file, found {what}")


def _read_bytes(path: Path) -> bytes:
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: expected a readable file, found {err.strerror or err}") from err


def _decompress(path: Path, raw: bytes) -> bytes:
    """Return the uncompressed content of ``raw`` (gzip when the name or magic says so)."""
    is_gz_name = path.name.endswith(".gz")
    if not raw.startswith(_GZIP_MAGIC):
        if is_gz_name:
            raise DataError(
                f"{path}: expected gzip-compressed data (.gz), found {_describe_start(raw)}"
            )
        return raw
    try:
        return gzip.decompress(raw)
    except _GZIP_ERRORS as err:
        raise DataError(
            f"{path}: expected a complete gzip stream, found a truncated or corrupt one "
            f"({str(err) or type(err).__name__}); delete the file and fetch or copy it again"
        ) from err


def _check_idx(
    path: Path,
    data: bytes,
    kind: Literal["images", "labels"],
    expected_count: int | None,
    expected_shape: tuple[int, int] | None,
) -> tuple[tuple[int, ...], int]:
    """Check an uncompressed IDX buffer's magic, dimensions, count and length.

    Returns:
        ``(dims, header length)``.
    """
    want_magic = _IDX_MAGIC[kind]
    ndim = _IDX_NDIM[kind]
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(
            f"{path}: expected an IDX header of {header_len} bytes, found "
            f"{'an empty file' if not data else f'only {len(data)} bytes'}"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != want_magic:
        raise DataError(
            f"{path}: expected IDX magic {want_magic} (uint8 {kind}, {ndim} dims), found {magic}"
        )
    if len(data) < header_len:
        raise DataError(
            f"{path}: expected an IDX header of {header_len} bytes, found only {len(data)} bytes"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = dims[0]
    if expected_count is not None and count != expected_count:
        raise DataError(
            f"{path}: expected {expected_count} {kind} in the IDX header, found {count}"
        )
    if kind == "images" and expected_shape is not None and dims[1:] != tuple(expected_shape):
        want = "x".join(map(str, expected_shape))
        raise DataError(f"{path}: expected {want} images, found {dims[1]}x{dims[2]}")
    # math.prod on Python ints: a corrupt header's dims can overflow a fixed-width product.
    want_len = math.prod(dims)
    have_len = len(data) - header_len
    if have_len != want_len:
        problem = "truncated" if have_len < want_len else "trailing bytes after the data"
        raise DataError(
            f"{path}: expected {want_len} payload bytes for {count} {kind} of shape "
            f"{dims[1:] or '()'}, found {have_len} ({problem})"
        )
    return dims, header_len


def _parse_idx(
    path: Path,
    data: bytes,
    kind: Literal["images", "labels"],
    expected_count: int | None,
    expected_shape: tuple[int, int] | None,
) -> torch.Tensor:
    """Check an uncompressed IDX buffer and return its payload as a uint8 tensor."""
    dims, header_len = _check_idx(path, data, kind, expected_count, expected_shape)
    # copy(): frombuffer over immutable bytes gives a read-only array; torch warns about
    # tensors over non-writable memory, and writing to them is undefined behaviour.
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()
    return torch.from_numpy(arr)


def _check_label_range(path: str | os.PathLike[str], labels: Any, spec: DatasetSpec) -> None:
    """Raise unless every label (a 1-D tensor or array) is a class of ``spec``."""
    top = int(labels.max()) if len(labels) else 0
    if top >= spec.num_classes:
        raise DataError(f"{path}: expected labels 0..{spec.num_classes - 1}, found {top}")


def read_idx(
    path: str | os.PathLike[str],
    kind: Literal["images", "labels"],
    expected_count: int | None = None,
    expected_shape: tuple[int, int] | None = (28, 28),
) -> torch.Tensor:
    """Read an IDX file (``.gz`` or uncompressed) of uint8 images or labels.

    Args:
        path: The file. Gzip is detected by the ``.gz`` suffix or the gzip magic bytes.
        kind: ``"images"`` (magic 2051, 3 dims) or ``"labels"`` (magic 2049, 1 dim).
        expected_count: Number of items the header must declare, or ``None`` for any.
        expected_shape: ``(rows, cols)`` images must have, or ``None`` for any. Ignored for
            labels.

    Returns:
        A uint8 tensor: images ``(N, rows, cols)``, labels ``(N,)``.

    Raises:
        DataError: The file is missing, unreadable, not gzip although named ``.gz``,
            truncated or corrupt, has the wrong magic, count or image shape, or its payload
            is shorter or longer than the header says. The message names the path, what was
            expected and what was found. No other exception escapes for any file content.
    """
    if kind not in _IDX_MAGIC:
        raise ValueError(f"kind must be 'images' or 'labels', not {kind!r}")
    p = Path(path)
    return _parse_idx(p, _decompress(p, _read_bytes(p)), kind, expected_count, expected_shape)


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

Status = Literal["verified", "verified-content", "unverified", "damaged"]


@dataclass(frozen=True)
class FileInfo:
    """Identity of one data file, for logs and run metadata.

    Attributes:
        path: Absolute path of the file.
        size: Size in bytes, as stored.
        md5: md5 of the file as stored.
        sha256: sha256 of the file as stored.
        content_sha256: sha256 of the uncompressed content (equal to ``sha256`` for an
            uncompressed file); ``None`` when the file cannot be decompressed.
        status: ``"verified"`` (md5 equals the official ``.gz``), ``"verified-content"``
            (uncompressed sha256 equals the known upstream content, e.g. a recompressed
            copy), ``"unverified"`` (no known checksum, but it passes the loader's checks),
            or ``"damaged"`` (it fails them: the loader would refuse it).
        problem: Why a ``"damaged"`` file fails (the loader's message, without the path);
            ``None`` otherwise.
    """

    path: str
    size: int
    md5: str
    sha256: str
    content_sha256: str | None
    status: Status
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (JSON-ready); ``problem`` only when damaged."""
        out = {
            "path": self.path,
            "size": self.size,
            "md5": self.md5,
            "sha256": self.sha256,
            "content_sha256": self.content_sha256,
            "status": self.status,
        }
        if self.problem is not None:
            out["problem"] = self.problem
        return out


# (absolute path, size, mtime_ns) -> (md5, sha256, content_sha256). Hashing the 47 MB
# training images costs ~0.3 s; runs that ask for metadata repeatedly should not pay it twice.
_HASH_CACHE: dict[tuple[str, int, int], tuple[str, str, str | None]] = {}

# (absolute path, size, mtime_ns, dataset, file name) -> what the loader's checks found wrong
# with a file that matches no known checksum (None: nothing). The training images on our build
# machines are such a file: checking them costs a 47 MB decompression, so once per process.
_CHECK_CACHE: dict[tuple[str, int, int, str, str], str | None] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise DataError(f"{path}: expected a data file, found {err.strerror or err}") from err
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _hashes(
    path: Path, raw: bytes | None = None, content: bytes | None = None
) -> tuple[int, str, str, str | None]:
    """Return (size, md5, sha256, content_sha256), reading the file only on a cache miss."""
    key = _stat_key(path)
    hit = _HASH_CACHE.get(key)
    if hit is None:
        if raw is None:
            raw = _read_bytes(path)
        if content is None:
            try:
                content = _decompress(path, raw)
            except DataError:
                # A damaged archive still gets an identity (md5/sha256 of what is stored), so
                # `data info` can show it; reading it later reports the damage.
                content = None
        sha = hashlib.sha256(raw).hexdigest()
        if content is raw:
            content_sha: str | None = sha  # uncompressed file: no need to hash it twice
        else:
            content_sha = hashlib.sha256(content).hexdigest() if content is not None else None
        hit = (hashlib.md5(raw).hexdigest(), sha, content_sha)
        _HASH_CACHE[key] = hit
    return (key[1], *hit)


def _status(spec: DatasetSpec | None, filename: str, md5: str, content_sha: str | None) -> Status:
    if spec is None:
        return "unverified"
    if spec.md5.get(filename) == md5:
        return "verified"
    known = spec.content_sha256.get(filename)
    if known is not None and known == content_sha:
        return "verified-content"
    return "unverified"


def _role(spec: DatasetSpec, filename: str) -> tuple[str, Literal["images", "labels"]] | None:
    """Return (split, kind) of ``filename`` in ``spec``, or None when it is not one of its files."""
    for split, names in spec.files.items():
        if filename in names:
            return split, "images" if names.index(filename) == 0 else "labels"
    return None


def _problem(path: Path, spec: DatasetSpec, filename: str) -> str | None:
    """Run the loader's checks on one of ``spec``'s files; return what is wrong, or None.

    The checks are the loader's own (gzip, IDX magic, dimensions, count, payload length,
    label range), so a file passes here exactly when :func:`load_dataset` would read it.
    """
    role = _role(spec, filename)
    if role is None:
        return None
    split, kind = role
    key = (*_stat_key(path), spec.name, filename)
    if key in _CHECK_CACHE:
        return _CHECK_CACHE[key]
    try:
        content = _decompress(path, _read_bytes(path))
        _, header_len = _check_idx(path, content, kind, spec.counts[split], spec.image_shape)
        if kind == "labels":
            _check_label_range(path, np.frombuffer(content, np.uint8, offset=header_len), spec)
        problem = None
    except DataError as err:
        problem = str(err).removeprefix(f"{path}: ")
    _CHECK_CACHE[key] = problem
    return problem


def file_info(
    path: str | os.PathLike[str], spec: DatasetSpec | None, filename: str | None = None
) -> FileInfo:
    """Hash a data file and classify it against a dataset's known checksums.

    A file that matches no known checksum is checked as the loader checks it, and is
    ``"damaged"`` (with the reason in :attr:`FileInfo.problem`) when the loader would refuse it.

    Args:
        path: The file as stored (``.gz`` or uncompressed).
        spec: The dataset it belongs to (``None``: no known checksums, so "unverified").
        filename: Its canonical ``.gz`` name in ``spec.files`` (defaults to the path's name,
            with ``.gz`` appended when absent, so an already-unpacked file is matched by
            content).

    Returns:
        The file's :class:`FileInfo`. Hashes and checks are cached per (path, size, mtime).

    Raises:
        DataError: The file does not exist or cannot be read.
    """
    p = Path(path)
    if filename is None:
        filename = p.name if p.name.endswith(".gz") else p.name + ".gz"
    size, md5, sha, content_sha = _hashes(p)
    status = _status(spec, filename, md5, content_sha)
    problem = _problem(p, spec, filename) if spec is not None and status == "unverified" else None
    return FileInfo(
        os.path.abspath(p), size, md5, sha, content_sha, "damaged" if problem else status, problem
    )


def _locate(raw_dir: Path, filename: str) -> Path | None:
    """Find ``filename`` in ``raw_dir``, falling back to its unpacked (no ``.gz``) form.

    torchvision leaves both forms after extraction; some users keep only the unpacked one.
    """
    for candidate in (raw_dir / filename, raw_dir / filename.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class DataWarning(UserWarning):
    """A data file loaded but could not be verified against a known-good checksum."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset, fully in memory.

    The tensors are shared by every caller that loads the same split in this process (see
    :func:`load_dataset`); treat them as read-only and copy before modifying.

    Attributes:
        name: Canonical dataset name.
        split: ``"train"`` or ``"test"``.
        images: uint8 tensor ``(N, 28, 28)``.
        labels: int64 tensor ``(N,)``.
        files: :class:`FileInfo` of the images file, then the labels file.
        root: The resolved data root it was loaded from.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    files: tuple[FileInfo, ...]
    root: str

    @property
    def spec(self) -> DatasetSpec:
        """The dataset's :class:`DatasetSpec`."""
        return DATASETS[self.name]

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return self.spec.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names indexed by label."""
        return self.spec.class_names

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_DATASET_CACHE: dict[tuple[str, str, str], Dataset] = {}
_WARNED: set[tuple[str, str]] = set()


def clear_cache() -> None:
    """Forget loaded datasets (affNIST included) and already-issued warnings.

    The hash and check caches are kept: they are keyed by (path, size, mtime), so they cannot
    go stale. Meant for tests and long-lived processes.
    """
    _DATASET_CACHE.clear()
    _AFFNIST_CACHE.clear()
    _WARNED.clear()


def _missing_error(spec: DatasetSpec, what: str, raw_dir: Path, missing: list[str]) -> DataError:
    where = "folder does not exist" if not raw_dir.is_dir() else "missing " + ", ".join(missing)
    return DataError(
        f"{spec.display_name} {what} not found under {raw_dir} ({where}); {_fix_hint(spec)}"
    )


def _warn_unverified(spec: DatasetSpec, filename: str, info: FileInfo) -> None:
    key = (info.path, info.md5)
    if key in _WARNED:
        return
    _WARNED.add(key)
    note = spec.known_variants.get(info.md5)
    official = spec.md5.get(filename, "unknown")
    detail = f"; {note}" if note else ""
    warnings.warn(
        f"{info.path}: unverified {spec.display_name} file (md5 {info.md5}, official "
        f"{official}){detail}; its checksums are recorded in the run metadata",
        DataWarning,
        stacklevel=3,
    )


def load_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None) -> Dataset:
    """Load one split of MNIST or Fashion-MNIST from the data root.

    Each (dataset, split, resolved root) is read once per process; later calls return the
    same :class:`Dataset`.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"`` (aliases such as ``"Fashion-MNIST"`` work).
        split: ``"train"`` or ``"test"``.
        root: Data root (see :func:`resolve_data_root`).

    Returns:
        The split, with uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)``.

    Raises:
        ConfigError: Unknown dataset or split.
        DataError: Files are missing (the message says which, where, and how to fix it) or
            damaged.

    Warns:
        DataWarning: A file's checksums match no known-good copy (once per file per process).
    """
    key_name = canonical_name(name)
    split = _check_split(split)
    spec = DATASETS[key_name]
    root_path = resolve_data_root(root)
    cache_key = (key_name, split, str(root_path))
    if cache_key in _DATASET_CACHE:
        return _DATASET_CACHE[cache_key]

    raw_dir = root_path / spec.folder / "raw"
    names = spec.files[split]
    paths = [_locate(raw_dir, f) for f in names]
    missing = [f for f, p in zip(names, paths, strict=True) if p is None]
    if missing:
        raise _missing_error(spec, f"{split} data", raw_dir, missing)

    count = spec.counts[split]
    kinds: tuple[Literal["images", "labels"], ...] = ("images", "labels")
    tensors: list[torch.Tensor] = []
    infos: list[FileInfo] = []
    for kind, filename, path in zip(kinds, names, paths, strict=True):
        assert path is not None  # checked above; narrows the type
        raw = _read_bytes(path)
        try:
            content = _decompress(path, raw)
        except DataError as err:
            raise _with_damaged_hint(err, spec) from err
        size, md5, sha, content_sha = _hashes(path, raw, content)
        info = FileInfo(
            os.path.abspath(path),
            size,
            md5,
            sha,
            content_sha,
            _status(spec, filename, md5, content_sha),
        )
        try:
            tensors.append(_parse_idx(path, content, kind, count, spec.image_shape))
        except DataError as err:
            raise _with_damaged_hint(err, spec) from err
        infos.append(info)
        del raw, content  # the 47 MB buffers are not needed once parsed
        if info.status == "unverified":
            _warn_unverified(spec, filename, info)

    images, labels = tensors
    try:
        _check_label_range(infos[1].path, labels, spec)
    except DataError as err:
        raise _with_damaged_hint(err, spec) from err
    for filename, path in zip(names, paths, strict=True):
        assert path is not None
        _CHECK_CACHE[(*_stat_key(path), spec.name, filename)] = None  # no need to check again
    ds = Dataset(key_name, split, images, labels.long(), tuple(infos), str(root_path))
    _DATASET_CACHE[cache_key] = ds
    return ds


def _spec_and_splits(name: str, split: str | None) -> tuple[DatasetSpec, tuple[str, ...]]:
    spec = DATASETS[canonical_name(name)]
    return spec, SPLITS if split is None else (_check_split(split),)


def data_checksums(
    name: str, split: str | None = None, root: str | os.PathLike[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Return the checksums of a dataset's files, for run metadata.

    Args:
        name: Dataset name or alias.
        split: ``"train"``, ``"test"`` or ``None`` for both.
        root: Data root (see :func:`resolve_data_root`).

    Returns:
        ``{filename: {"sha256", "md5", "content_sha256", "status"}}``.

    Raises:
        ConfigError: Unknown dataset or split.
        DataError: A file is missing.
    """
    spec, splits = _spec_and_splits(name, split)
    raw_dir = spec.raw_dir(root)
    out: dict[str, dict[str, Any]] = {}
    for s in splits:
        paths = {f: _locate(raw_dir, f) for f in spec.files[s]}
        missing = [f for f, p in paths.items() if p is None]
        if missing:
            raise _missing_error(spec, f"{s} data", raw_dir, missing)
        for f, p in paths.items():
            info = file_info(p, spec, f)  # type: ignore[arg-type]
            out[f] = {
                "sha256": info.sha256,
                "md5": info.md5,
                "content_sha256": info.content_sha256,
                "status": info.status,
            }
    return out


def data_info(root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Describe every expected data file under the root, for ``capsbench data info``.

    Args:
        root: Data root (see :func:`resolve_data_root`).

    Returns:
        One row per expected file of every dataset and split, with keys ``dataset``,
        ``split``, ``file``, ``path``, ``present``, ``size``, ``md5``, ``sha256``, ``status``
        (the last four ``None`` when absent) and ``problem`` (why a ``"damaged"`` file is,
        else ``None``; see :func:`file_info`), then one ``affnist`` test row (present or not;
        affNIST files are not hashed or checked here because the test set is ~500 MB).
    """
    root_path = resolve_data_root(root)
    rows: list[dict[str, Any]] = []
    for spec in DATASETS.values():
        raw_dir = root_path / spec.folder / "raw"
        for split in SPLITS:
            for f in spec.files[split]:
                path = _locate(raw_dir, f)
                row: dict[str, Any] = {
                    "dataset": spec.name,
                    "split": split,
                    "file": f,
                    "path": str(path or raw_dir / f),
                    "present": path is not None,
                    "size": None,
                    "md5": None,
                    "sha256": None,
                    "status": None,
                    "problem": None,
                }
                if path is not None:
                    info = file_info(path, spec, f)
                    row.update(size=info.size, md5=info.md5, sha256=info.sha256)
                    row.update(status=info.status, problem=info.problem)
                rows.append(row)
    aff = find_affnist(root_path)
    rows.append(
        {
            "dataset": "affnist",
            "split": "test",
            "file": ", ".join(p.name for p in aff) if aff else "test.mat or test_batches/*.mat",
            "path": str(root_path / AFFNIST_FOLDER),
            "present": aff is not None,
            "size": sum(p.stat().st_size for p in aff) if aff else None,
            "md5": None,
            "sha256": None,
            "status": "unverified" if aff else None,
            "problem": None,
        }
    )
    return rows


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


class _NetworkError(Exception):
    """Internal: a mirror could not be reached at all (as opposed to answering wrongly)."""


def _download(url: str, dest_dir: Path, timeout: float) -> tuple[Path, str]:
    """Stream ``url`` into a temp file in ``dest_dir``; return (temp path, md5)."""
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        raise  # the server answered: not a network problem
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise _NetworkError(str(reason)) from err
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=dest_dir)
    md5 = hashlib.md5()
    try:
        with resp, os.fdopen(fd, "wb") as out:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
    except BaseException as err:
        # Never leave a partial download behind, whatever stopped it (Ctrl-C included).
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (socket.timeout, ConnectionError, http.client.HTTPException)):
            raise _NetworkError(str(err)) from err
        raise
    return Path(tmp), md5.hexdigest()


def fetch_dataset(
    name: str, root: str | os.PathLike[str] | None = None, timeout: float = 20
) -> list[Path]:
    """Download the missing and damaged files of a dataset into ``<root>/<folder>/raw/``.

    Mirrors are tried in turn. Each file is written to a temporary file next to its final
    place and renamed only once its md5 equals the official one, so an interrupted or
    tampered download never looks like a valid file. A present file is damaged when
    :func:`file_info` says so (it matches no known checksum and fails the loader's checks);
    the download replaces it, and a failed download leaves it as it was.

    Args:
        name: Dataset name or alias.
        root: Data root (see :func:`resolve_data_root`); created if needed.
        timeout: Socket timeout per connection attempt, in seconds.

    Returns:
        The paths downloaded now (empty when every file was already present and undamaged).

    Raises:
        ConfigError: Unknown dataset.
        DataError: The root is not writable; no mirror could be reached (one line saying
            so and how to use local files instead; when a file was there but damaged, it
            names the file and the damage first); or every mirror answered with an error
            or a file whose md5 is wrong.
    """
    spec = DATASETS[canonical_name(name)]
    root_path = resolve_data_root(root)
    raw_dir = root_path / spec.folder / "raw"
    todo: list[str] = []
    damaged: dict[str, FileInfo] = {}
    for f in spec.filenames():
        present = _locate(raw_dir, f)
        if present is None:
            todo.append(f)
            continue
        info = file_info(present, spec, f)
        if info.status == "damaged":
            todo.append(f)
            damaged[f] = info
    if not todo:
        return []
    hint = f"point the data root at local files with --data-root PATH or {DATA_ENV}=PATH"
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on an existing read-only folder; probe that we can create files.
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=raw_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DataError(
            f"cannot write to data root {root_path} ({err.strerror or err}); {hint}"
        ) from err

    fetched: list[Path] = []
    for filename in todo:
        dest = raw_dir / filename
        failures: list[str] = []
        network: list[str] = []
        for mirror in spec.mirrors:
            url = mirror + filename
            try:
                tmp, md5 = _download(url, raw_dir, timeout)
            except _NetworkError as err:
                network.append(str(err))
                failures.append(f"{url}: {err}")
                continue
            except urllib.error.HTTPError as err:
                failures.append(f"{url}: HTTP {err.code}")
                continue
            except OSError as err:
                raise DataError(f"cannot write {dest} ({err.strerror or err}); {hint}") from err
            if md5 != spec.md5[filename]:
                tmp.unlink(missing_ok=True)
                failures.append(f"{url}: md5 {md5}, expected {spec.md5[filename]}")
                continue
            os.replace(tmp, dest)
            fetched.append(dest)
            break
        else:
            if len(network) == len(spec.mirrors):
                msg = f"cannot download {spec.display_name} (no network: {network[0]}); {hint}"
            else:
                msg = (
                    f"cannot download {spec.display_name} file {filename}: "
                    + "; ".join(failures)
                    + f"; {hint}"
                )
            bad = damaged.get(filename)
            if bad is not None:
                msg = f"{bad.path} is damaged ({bad.problem}) and {msg}"
            raise DataError(msg)
    return fetched


def ensure_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    split: str = "train",
) -> Dataset:
    """Load a dataset split, downloading the dataset's missing files first if allowed.

    Args:
        name: Dataset name or alias.
        root: Data root (see :func:`resolve_data_root`).
        download: Fetch missing files (all four) before loading.
        split: Split to return.

    Returns:
        The loaded split (see :func:`load_dataset`).

    Raises:
        ConfigError: Unknown dataset or split.
        DataError: Files are missing and could not be fetched, or are damaged.
    """
    spec = DATASETS[canonical_name(name)]
    split = _check_split(split)
    raw_dir = spec.raw_dir(root)
    missing = [f for f in spec.filenames() if _locate(raw_dir, f) is None]
    if download and missing:
        where = "folder does not exist" if not raw_dir.is_dir() else "missing " + ", ".join(missing)
        created = [d for d in (raw_dir.parent.parent, raw_dir.parent, raw_dir) if not d.exists()]
        try:
            fetch_dataset(spec.name, root)
        except DataError as err:
            # The failed download leaves nothing behind: remove the empty folders it made.
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    break
            raise DataError(
                f"{spec.display_name} not found under {raw_dir} ({where}) and {err}"
            ) from err
    return load_dataset(spec.name, split, root)


# --------------------------------------------------------------------------------------------
# affNIST
# --------------------------------------------------------------------------------------------


def affnist_columns_to_images(image: np.ndarray) -> np.ndarray:
    """Turn affNIST's ``image`` matrix (1600 x N, one image per column) into ``(N, 40, 40)``.

    Each column holds one 40x40 image in *row-major* order: pixel (row r, col c) is element
    ``r * 40 + c``. This is what the official MATLAB reader's ``reshape(col, 40, 40)'`` means
    (MATLAB reshapes column-major, and the transpose turns that into row-major), and what
    the widely used Python readers do (``image.T.reshape(N, 40, 40)``). Getting this wrong
    silently transposes every digit, so it lives in one named, tested place.

    Args:
        image: Array of shape ``(1600, N)``.

    Returns:
        A C-contiguous array ``(N, 40, 40)`` of the same dtype.
    """
    n = image.shape[1]
    return np.ascontiguousarray(image.T).reshape(n, *AFFNIST_SHAPE)


def _mat_field(record: np.ndarray, field: str, path: Path) -> np.ndarray:
    names = record.dtype.names or ()
    if field not in names:
        raise DataError(
            f"{path}: expected field {field!r} in affNISTdata, found fields {list(names)}"
        )
    return np.asarray(record[field].reshape(-1)[0])


# MAT v5 element data types (MATLAB "MAT-File Format", table 1-1) and array classes. Only
# the data types scipy has a dtype for are accepted (not 0, 8, 10, 11, 14, 15, 19+).
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 1, 5, 6, 14, 15, 16
_MI_DATA_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18})
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = frozenset(range(6, 16))  # double, single, int8 .. uint64
_MAT_MAX_DIMS = 32  # scipy's limit
_MAT_MAX_DEPTH = 32


class _MatChecker:
    """Walks a MAT v5 file in the order scipy's reader will, checking every element first.

    scipy's Cython v5 reader trusts the file: an element type code is used as a table index
    unchecked, and sub-elements are read sequentially without regard to the enclosing
    matrix's size, so one flipped byte can make ``loadmat`` read past an array and crash the
    process with SIGSEGV/SIGBUS (scipy 1.17; see scipy PRs #25349 and #25166). A crash cannot
    be turned into a DataError, so this walks the same elements scipy will read (for the
    array classes affNIST uses: numeric, char, cell and struct) and requires each to have a
    valid type, to fit inside its parent, and each matrix to be exactly consumed.
    Python-level errors scipy raises itself are left to it.
    """

    def __init__(self, path: Path, order: str) -> None:
        self.path = path
        self.order = order

    def fail(self, what: str) -> DataError:
        return DataError(f"{self.path}: expected {what} (damaged .mat file)")

    def tag(self, buf: memoryview, pos: int, end: int) -> tuple[int, int, int, int]:
        """Return (type, size, data start, next position) of the element at ``pos``."""
        if end - pos < 8:
            raise self.fail(f"an 8-byte element tag at offset {pos}, found {max(end - pos, 0)}")
        first, second = struct.unpack_from(self.order + "II", buf, pos)
        if first >> 16:  # small data element: type and size packed into the first 4 bytes
            mdtype, nbytes = first & 0xFFFF, first >> 16
            if nbytes > 4:
                raise self.fail(f"a small element of at most 4 bytes at offset {pos}")
            return mdtype, nbytes, pos + 4, pos + 8
        if pos + 8 + second > end:
            raise self.fail(f"{second} bytes for the element at offset {pos}, found fewer")
        return first, second, pos + 8, pos + 8 + (second + 7) // 8 * 8

    def data(self, buf: memoryview, pos: int, end: int, allowed: frozenset[int]) -> int:
        mdtype, _, _, nxt = self.tag(buf, pos, end)
        if mdtype not in allowed:
            raise self.fail(f"a data element at offset {pos}, found element type {mdtype}")
        return nxt

    def matrix(self, buf: memoryview, pos: int, end: int, depth: int) -> int:
        """Check the miMATRIX element at ``pos``; return the position after it."""
        if depth > _MAT_MAX_DEPTH:
            raise self.fail(f"at most {_MAT_MAX_DEPTH} nested arrays")
        if end - pos < 8:
            raise self.fail(f"an array at offset {pos}, found the end of the data")
        mdtype, nbytes = struct.unpack_from(self.order + "II", buf, pos)
        if mdtype != _MI_MATRIX:
            raise self.fail(f"an array (type 14) at offset {pos}, found element type {mdtype}")
        body, body_end = pos + 8, pos + 8 + nbytes
        if body_end > end:
            raise self.fail(f"{nbytes} bytes for the array at offset {pos}, found fewer")
        if nbytes == 0:
            return body_end  # an empty matrix: scipy reads nothing more
        # Array flags: scipy reads these 16 bytes blindly, so insist on the standard form.
        if body_end - body < 16 or struct.unpack_from(self.order + "II", buf, body) != (6, 8):
            raise self.fail(f"array flags at offset {body}")
        flags = struct.unpack_from(self.order + "I", buf, body + 8)[0]
        mclass, is_complex = flags & 0xFF, bool(flags >> 11 & 1)
        if mclass not in _MX_NUMERIC | {_MX_CELL, _MX_STRUCT, _MX_CHAR}:
            raise self.fail(
                f"a numeric, char, cell or struct array at offset {pos}, found class {mclass}"
            )
        p = body + 16
        dtype, dbytes, dstart, p = self.tag(buf, p, body_end)
        if dtype not in (_MI_INT32, _MI_UINT32) or dbytes % 4 or dbytes > 4 * _MAT_MAX_DIMS:
            raise self.fail(f"array dimensions at offset {dstart - 8}")
        dims = struct.unpack_from(f"{self.order}{dbytes // 4}i", buf, dstart)
        if any(d < 0 for d in dims):
            raise self.fail(f"non-negative array dimensions at offset {dstart - 8}")
        p = self.data(buf, p, body_end, frozenset({_MI_INT8, _MI_UTF8}))  # array name
        count = math.prod(dims)
        if mclass in _MX_NUMERIC:
            for _ in range(2 if is_complex else 1):
                p = self.data(buf, p, body_end, _MI_DATA_TYPES)
        elif mclass == _MX_CHAR:
            p = self.data(buf, p, body_end, _MI_DATA_TYPES)
        else:
            n_fields = 1
            if mclass == _MX_STRUCT:
                ltype, lbytes, lstart, p = self.tag(buf, p, body_end)
                length = struct.unpack_from(self.order + "i", buf, lstart)[0] if lbytes == 4 else 0
                if ltype not in (_MI_INT32, _MI_UINT32) or length <= 0:
                    raise self.fail(f"a positive field-name length at offset {lstart}")
                _, nbytes_names, _, _ = self.tag(buf, p, body_end)
                p = self.data(buf, p, body_end, frozenset({_MI_INT8, _MI_UTF8}))
                n_fields = nbytes_names // length
            # Every sub-array takes at least 8 bytes: bound the loop (and scipy's allocation)
            # by what is actually there before trusting the dimensions.
            if count * n_fields * 8 > body_end - p:
                raise self.fail(f"{count * n_fields} sub-arrays at offset {p}, found fewer")
            for _ in range(count * n_fields):
                p = self.matrix(buf, p, body_end, depth + 1)
        if p != body_end:
            raise self.fail(f"the array at offset {pos} to end at {body_end}, not {p}")
        return body_end

    def file(self, raw: bytes) -> None:
        buf = memoryview(raw)
        pos = 128
        while pos < len(buf):
            if len(buf) - pos < 8:
                raise self.fail(f"a variable at offset {pos}, found {len(buf) - pos} stray bytes")
            mdtype, nbytes = struct.unpack_from(self.order + "II", buf, pos)
            nxt = pos + 8 + nbytes
            if nbytes == 0 or nxt > len(buf):
                raise self.fail(f"{nbytes} bytes for the variable at offset {pos} (truncated?)")
            if mdtype == _MI_COMPRESSED:
                inflater = zlib.decompressobj()
                try:
                    inner = inflater.decompress(buf[pos + 8 : nxt])
                except zlib.error as err:
                    raise self.fail(f"a zlib stream at offset {pos} ({err})") from err
                if not inflater.eof:
                    raise self.fail(f"a complete zlib stream at offset {pos} (truncated?)")
                if self.matrix(memoryview(inner), 0, len(inner), 0) != len(inner):
                    raise self.fail(f"one array in the zlib stream at offset {pos}")
                del inner
            elif mdtype == _MI_MATRIX:
                self.matrix(buf, pos, nxt, 0)
            else:
                raise self.fail(f"a variable at offset {pos}, found element type {mdtype}")
            pos = nxt


def _check_mat_v5(path: Path, raw: bytes) -> None:
    """Check a MAT v5/v7 file's header and elements before scipy parses it.

    Raises:
        DataError: Not a MAT v5/v7 file (e.g. v7.3/HDF5), or damaged (see ``_MatChecker``).
    """
    if len(raw) < 128:
        raise DataError(
            f"{path}: expected a MATLAB .mat file (128-byte header), found {_describe_start(raw)}"
        )
    marker = raw[126:128]
    if marker not in (b"IM", b"MI"):
        raise DataError(f"{path}: expected a MATLAB v5 .mat file, found no MAT-file header")
    order = "<" if marker == b"IM" else ">"
    version = struct.unpack(order + "H", raw[124:126])[0]
    if version == 0x0200:
        raise DataError(
            f"{path}: expected a MATLAB v5/v7 .mat file, found a v7.3 (HDF5) file; "
            "re-save it in MATLAB with save(..., '-v7')"
        )
    if version != 0x0100:
        raise DataError(f"{path}: expected MAT-file version 0x0100, found 0x{version:04x}")
    _MatChecker(path, order).file(raw)


def read_affnist_mat(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one affNIST ``.mat`` file (the whole test set or one of its batches).

    The file holds a MATLAB struct ``affNISTdata`` with fields ``image`` (1600 x N, uint8,
    one image per column; see :func:`affnist_columns_to_images`) and ``label_int`` (1 x N).

    Args:
        path: The ``.mat`` file.

    Returns:
        ``(images, labels)``: uint8 ``(N, 40, 40)`` and int64 ``(N,)``.

    Raises:
        DataError: The file is missing, not a MATLAB v5/v7 file, damaged, lacks the
            ``affNISTdata`` struct or its fields, has wrong shapes, non-uint8-representable
            pixels, or labels outside 0..9. The message names the file.
    """
    import scipy.io  # deferred: scipy is only needed for affNIST and costs ~0.3 s to import

    p = Path(path)
    raw = _read_bytes(p)
    _check_mat_v5(p, raw)
    try:
        mat = scipy.io.loadmat(io.BytesIO(raw), squeeze_me=False, struct_as_record=True)
    except Exception as err:
        # scipy's parser raises ValueError, TypeError, struct.error, zlib.error,
        # MemoryError, ... on corrupt input; to the user they all mean "not a valid .mat".
        raise DataError(
            f"{p}: expected a MATLAB .mat file, found unreadable data ({type(err).__name__}: {err})"
        ) from err
    del raw
    if "affNISTdata" not in mat:
        keys = [k for k in mat if not k.startswith("__")]
        raise DataError(f"{p}: expected variable 'affNISTdata', found {keys}")
    record = mat["affNISTdata"]
    if not isinstance(record, np.ndarray) or record.dtype.names is None or record.size != 1:
        found = f"{type(record).__name__} {getattr(record, 'shape', '')}".strip()
        raise DataError(f"{p}: expected 'affNISTdata' to be a 1x1 struct, found {found}")
    image = _mat_field(record, "image", p)
    labels = _mat_field(record, "label_int", p)

    pixels = AFFNIST_SHAPE[0] * AFFNIST_SHAPE[1]
    if image.ndim != 2 or image.shape[0] != pixels:
        raise DataError(f"{p}: expected 'image' of shape ({pixels}, N), found {image.shape}")
    n = image.shape[1]
    if labels.size != n or (labels.ndim == 2 and 1 not in labels.shape) or labels.ndim > 2:
        raise DataError(f"{p}: expected 'label_int' of shape (1, {n}), found {labels.shape}")
    if image.dtype != np.uint8:
        # Re-saved copies sometimes store pixels as double; accept them only when exact.
        if (
            not np.issubdtype(image.dtype, np.number)
            or np.iscomplexobj(image)
            or (
                image.size
                and (image.min() < 0 or image.max() > 255 or not np.all(np.mod(image, 1) == 0))
            )
        ):
            raise DataError(f"{p}: expected uint8 pixels 0..255 in 'image', found {image.dtype}")
        image = image.astype(np.uint8)
    labels = labels.reshape(-1)
    if (
        not np.issubdtype(labels.dtype, np.number)
        or np.iscomplexobj(labels)
        or (labels.size and not np.all(np.mod(labels, 1) == 0))
    ):
        raise DataError(f"{p}: expected integer labels in 'label_int', found {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(
            f"{p}: expected labels 0..9 in 'label_int', found {labels.min()}..{labels.max()}"
        )
    images = affnist_columns_to_images(image)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _batch_key(p: Path) -> tuple[int, int | str]:
    # Batches are named 1.mat .. 32.mat: sort numerically so 10.mat comes after 9.mat.
    return (0, int(p.stem)) if p.stem.isdigit() else (1, p.stem)


def find_affnist(root: str | os.PathLike[str] | None = None) -> list[Path] | None:
    """Find the real affNIST test set under ``<root>/affNIST/``.

    Args:
        root: Data root (see :func:`resolve_data_root`).

    Returns:
        ``[<root>/affNIST/test.mat]`` if it exists, else the ``test_batches/*.mat`` files in
        numeric order, else ``None``.
    """
    folder = resolve_data_root(root) / AFFNIST_FOLDER
    single = folder / "test.mat"
    if single.is_file():
        return [single]
    batches = sorted((folder / "test_batches").glob("*.mat"), key=_batch_key)
    batches = [b for b in batches if b.is_file()]
    return batches or None


# (path, size, mtime_ns) of every file read -> (images, labels, files). One entry: the real
# test set is 512 MB, read once per process however many models and seeds score it.
_AFFNIST_CACHE: dict[tuple[tuple[str, int, int], ...], tuple[torch.Tensor, torch.Tensor, list]] = {}


def _affnist_hint(path: Path) -> str:
    return (
        "replace it with the official affNIST test set "
        "(https://www.cs.toronto.edu/~tijmen/affNIST/), or move it out of "
        f"{path.parent} to use the generated affnist_synth set instead"
    )


def load_affnist_test(
    root: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]] | None:
    """Load the real affNIST test set if present.

    The result is kept for the rest of the process (until :func:`clear_cache`, or until a
    file changes): treat the tensors as read-only.

    Args:
        root: Data root (see :func:`resolve_data_root`).

    Returns:
        ``(images, labels, files)`` with uint8 images ``(N, 40, 40)``, int64 labels ``(N,)``
        and one :meth:`FileInfo.as_dict` per file read (status ``"unverified"``: no official
        checksums are published), or ``None`` when no affNIST files are found.

    Raises:
        DataError: A file is present but damaged. The message names the file and says how
            to replace it or fall back to the generated set.
    """
    paths = find_affnist(root)
    if paths is None:
        return None
    key = tuple(_stat_key(p) for p in paths)
    hit = _AFFNIST_CACHE.get(key)
    if hit is not None:
        images_t, labels_t, files_cached = hit
        return images_t, labels_t, [dict(f) for f in files_cached]
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    files: list[dict[str, Any]] = []
    for p in paths:
        try:
            x, y = read_affnist_mat(p)
        except DataError as err:
            raise DataError(f"{err}; {_affnist_hint(p)}") from err
        images.append(x)
        labels.append(y)
        files.append(file_info(p, None, p.name).as_dict())
    if len(images) == 1:
        result = images[0], labels[0]
    else:
        result = torch.cat(images), torch.cat(labels)
    _AFFNIST_CACHE.clear()
    _AFFNIST_CACHE[key] = (*result, files)
    return result[0], result[1], [dict(f) for f in files]
