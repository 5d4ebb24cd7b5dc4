"""The checksums and state (verified, known reconstruction, unverified, damaged, missing) of the
files under a data root, cached by path, size and modification time."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from capsbench.data.idx import _check_idx, _check_label_range, _decompress, _read_bytes
from capsbench.data.specs import DatasetSpec
from capsbench.errors import DataError

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
