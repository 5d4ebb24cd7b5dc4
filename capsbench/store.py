"""Run directories, atomic writes, job keys and provenance.

Everything capsbench writes goes through here, so a crash at any moment leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from capsbench.errors import CapsbenchError

# Identity columns first, then grid parameters (free), then metric/value/n, then provenance.
ID_COLUMNS = ["run_id", "suite", "model", "seed", "train_data", "eval_data", "transform", "cell"]
VALUE_COLUMNS = ["metric", "value", "n"]
PROVENANCE_COLUMNS = ["profile", "device", "git_sha", "data_sha256", "job_key", "error"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Columns of results.csv that hold text (names, keys, hashes). They are read back as text, never
# guessed: a job key like 1234e5678901 would become a float, an all-digit one an int, and a
# data hash would lose its leading zeros; then no row matches its job and all is redone.
TEXT_COLUMNS = ("run_id", "suite", "model", "train_data", "eval_data", "transform", "cell", "direction",
                "metric", "profile", "device", "git_sha", "data_sha256", "job_key", "error")

_UMASK: list[int] = []


def _umask() -> int:
    """The process's umask, read once (reading it means setting it, so not on every write)."""
    if not _UMASK:
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK.append(mask)
    return _UMASK[0]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    return repr(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_predictions(folder: str | os.PathLike, cell: str, arrays: Mapping[str, Any]) -> Path:
    """Write one cell's per-image predictions as ``<folder>/<cell>.npz`` (atomically): plain
    NumPy arrays (``pred``, ``label`` int16, ``conf_true``, ``conf_pred`` float16), readable without torch
    (``numpy.load``)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                     for k, v in arrays.items()})
    return atomic_write_bytes(Path(folder) / f"{cell}.npz", buf.getvalue())


def read_predictions(folder: str | os.PathLike, cell: str) -> dict[str, Any] | None:
    """One cell's per-image predictions as NumPy arrays, or None when there are none. Reads
    ``<cell>.npz`` and, from runs written before that format, ``<cell>.pt`` (a torch file of
    tensors); raises on a damaged file."""
    import numpy as np

    folder = Path(folder)
    npz, pt = folder / f"{cell}.npz", folder / f"{cell}.pt"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if pt.is_file():
        d = torch.load(pt, weights_only=True)
        return {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in d.items()}
    return None


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hash of a JSON-able object, stable across processes and machines."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def write_rows_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write tidy rows as CSV (atomically), identity columns first."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    return atomic_write_text(path, order_columns(df).to_csv(index=False))


def order_columns(df):
    first = [c for c in ID_COLUMNS if c in df.columns]
    tail = [c for c in VALUE_COLUMNS + PROVENANCE_COLUMNS if c in df.columns]
    middle = [c for c in df.columns if c not in first and c not in tail]
    return df[first + middle + tail]


def _unwritable(path: Path, reason: str) -> CapsbenchError:
    return CapsbenchError(
        f"output directory {path} is not writable ({reason}); choose another with --out DIR"
    )


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Prove that ``path`` is, or can be created as, a writable folder; create nothing.

    Meant for the checks a command makes before any work: a failing command must leave no
    trace. The nearest existing folder at or above ``path`` gets a short-lived probe file.

    Returns:
        The absolute path.

    Raises:
        CapsbenchError: ``path`` (or a parent) is a regular file, or the nearest existing
            folder cannot be written. The message names the path and the fix (``--out``).
    """
    path = Path(os.path.abspath(os.fspath(path)))
    existing = path
    while not existing.exists() and existing.parent != existing:
        if existing.is_symlink():
            raise _unwritable(path, f"{existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is an existing file" if existing == path else f"is under {existing}, which is a file"
        raise CapsbenchError(f"output directory {path} {where}, not a folder; choose another with --out DIR")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise _unwritable(path, reason if existing == path else f"{existing}: {reason}") from None
    return path


def archive_previous(folder: str | os.PathLike, names: tuple[str, ...] = ("results.csv", "run.json")) -> Path | None:
    """Move the files ``names`` an earlier command left in ``folder`` to
    ``folder/previous/<UTC time of the newest of them>/`` (a new command's results replace them
    there, but nothing finished is lost); return that folder, or None when there was nothing."""
    folder = Path(folder)
    present = [folder / n for n in names if (folder / n).is_file()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(max(p.stat().st_mtime for p in present)))
    dest = folder / "previous" / stamp
    k = 1
    while dest.exists():
        k += 1
        dest = folder / "previous" / f"{stamp}-{k}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    return dest


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work starts."""
    path = Path(path)
    check_writable_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _unwritable(path, e.strerror or str(e)) from None
    return path.resolve()


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """The commit of the capsbench source tree ("unknown" outside a git checkout)."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and hardware, for run.json."""
    import capsbench
    from capsbench.malloc import malloc_state
    from capsbench.perf.isa import isa_info

    info: dict[str, Any] = {
        "capsbench": capsbench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "malloc": malloc_state(),
        "cpu_isa": isa_info(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        import timm

        info["timm"] = timm.__version__
    except Exception:  # pragma: no cover
        pass
    if device is not None:
        dev = torch.device(device)
        info["device"] = str(dev)
        if dev.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(dev)
            info["cuda"] = torch.version.cuda
        else:
            info["device_name"] = platform.processor() or platform.machine()
    return info
