"""Downloading the data sets (from their mirrors, checksummed) and making sure they are there
before a run starts; offline, one clear error that says where to put the files."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from capsbench.data.datasets import Dataset, load_dataset
from capsbench.data.files import FileInfo, _locate, file_info
from capsbench.data.specs import DATA_ENV, DATASETS, _check_split, canonical_name, resolve_data_root
from capsbench.errors import DataError

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
