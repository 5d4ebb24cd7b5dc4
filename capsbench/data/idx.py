"""Reading IDX files (MNIST's format, gzipped or not), checking every field against what the
data set says it should hold, so a damaged file is named and explained, never half-read."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from capsbench.data.specs import DatasetSpec
from capsbench.errors import DataError

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of
# dimensions. We only ever expect uint8 images (3 dims) and uint8 labels (1 dim).
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
_IDX_NDIM = {"images": 3, "labels": 1}
_GZIP_MAGIC = b"\x1f\x8b"

# Exceptions that gzip/zlib raise on truncated or corrupt input; all of them mean "this file
# is damaged", which the user must hear as a DataError rather than a traceback.
_GZIP_ERRORS = (OSError, EOFError, zlib.error, ValueError, struct.error)


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
