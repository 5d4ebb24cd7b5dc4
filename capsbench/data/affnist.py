"""The real affNIST test set (Tieleman 2013): its MATLAB v5 ``.mat`` batches, checked and read
without scipy's loader trusting the file, cached per process."""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.data.files import _stat_key, file_info
from capsbench.data.idx import _describe_start, _read_bytes
from capsbench.data.specs import resolve_data_root
from capsbench.errors import DataError

AFFNIST_FOLDER = "affNIST"
AFFNIST_SHAPE = (40, 40)


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
