"""MNIST and Fashion-MNIST as tensors (:func:`load_dataset`), and what a data root holds.

The data lives under a *data root* in torchvision's layout (``<root>/MNIST/raw/*.gz``,
``<root>/FashionMNIST/raw/*.gz``, plus ``<root>/affNIST/`` for the real affNIST files), so a
folder that torchvision already filled works as is. The root is, in order: an explicit
argument (the CLI's ``--data-root``), the ``CAPSBENCH_DATA`` environment variable, or
``./datasets``.

Everything a user can get wrong here (a missing folder, a truncated download, a file that is
not what its name says) raises :class:`~capsbench.errors.DataError` with a message that names
the file, what was expected and what was found (the files: :mod:`capsbench.data.specs`,
their checks: :mod:`capsbench.data.idx` and :mod:`capsbench.data.files`, downloads:
:mod:`capsbench.data.fetch`, affNIST's ``.mat`` files: :mod:`capsbench.data.affnist`). Files whose checksums match no known-good
copy still load, with a :class:`DataWarning`, because a faithful-but-different copy (such as
a recompressed archive) is common and should not stop a run; the checksum of every file is
recorded in the run's metadata so such runs stay traceable. Such files are also checked the
way the loader checks them (gzip, IDX magic, dimensions, counts, labels) wherever they are
only hashed, so ``capsbench data info`` shows a damaged one as ``damaged`` and
:func:`~capsbench.data.fetch.fetch_dataset` replaces it.

Example:
    >>> ds = load_dataset("mnist", "test")          # doctest: +SKIP
    >>> ds.images.shape, ds.labels.dtype            # doctest: +SKIP
    (torch.Size([10000, 28, 28]), torch.int64)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from capsbench.data.affnist import _AFFNIST_CACHE, AFFNIST_FOLDER, find_affnist
from capsbench.data.files import _CHECK_CACHE, FileInfo, _hashes, _locate, _stat_key, _status, file_info
from capsbench.data.idx import _check_label_range, _decompress, _parse_idx, _read_bytes
from capsbench.data.specs import (
    DATASETS,
    SPLITS,
    DatasetSpec,
    _check_split,
    _fix_hint,
    _with_damaged_hint,
    canonical_name,
    resolve_data_root,
)
from capsbench.errors import DataError

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
