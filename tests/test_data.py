"""Tests for capsbench.data.datasets: real MNIST/Fashion-MNIST files, damaged files, fetching, affNIST."""

from __future__ import annotations

import dataclasses
import gzip
import io
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsbench import data
from capsbench.data import datasets
from capsbench.data.affnist import (
    affnist_columns_to_images,
    find_affnist,
    load_affnist_test,
    read_affnist_mat,
)
from capsbench.data.datasets import DataWarning, clear_cache, data_checksums, data_info, load_dataset
from capsbench.data.fetch import fetch_dataset
from capsbench.data.files import file_info
from capsbench.data.idx import read_idx
from capsbench.data.specs import DATASETS, resolve_data_root
from capsbench.errors import ConfigError, DataError

MNIST = DATASETS["mnist"]
OFFICIAL_MNIST = [
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


# ---------------------------------------------------------------------------------------------
# Helpers: small but real-format IDX files
# ---------------------------------------------------------------------------------------------


def idx_bytes(kind: str, n: int = 5, shape: tuple[int, int] = (28, 28), seed: int = 0) -> bytes:
    """Build a valid uncompressed IDX buffer of uint8 images or labels."""
    rng = np.random.default_rng(seed)
    if kind == "images":
        header = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, *shape))
        payload = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8).tobytes()
    else:
        header = (0x0801).to_bytes(4, "big") + n.to_bytes(4, "big")
        payload = rng.integers(0, 10, size=n, dtype=np.uint8).tobytes()
    return header + payload


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::capsbench.data.datasets.DataWarning")  # checked in its own test
def test_mnist_train_real(data_root: Path) -> None:
    ds = load_dataset("mnist", "train", data_root)
    assert ds.images.shape == (60000, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (60000,) and ds.labels.dtype == torch.int64
    assert len(ds) == 60000 and ds.num_classes == 10
    assert ds.class_names == tuple("0123456789")
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.bincount(ds.labels).tolist()[1] == 6742  # official count of "1"s
    # Official 33.318, the shared reconstruction 33.331 (README of the shared data).
    assert abs(ds.images.float().mean().item() - 33.32) < 0.05
    assert ds.root == str(data_root)
    # Loaded once per process: the same object comes back, also through an alias.
    assert load_dataset("MNIST", "train", data_root) is ds


def test_mnist_test_real(data_root: Path) -> None:
    ds = load_dataset("mnist", "test", data_root)
    assert ds.images.shape == (10000, 28, 28) and ds.labels.shape == (10000,)
    assert abs(ds.images.float().mean().item() - 33.79) < 0.01
    assert ds.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits
    assert [f.status for f in ds.files] == ["verified", "verified"]


def test_mnist_checksums_and_warning(data_root: Path) -> None:
    sums = data_checksums("mnist", root=data_root)
    assert set(sums) == set(MNIST.filenames())
    for name in OFFICIAL_MNIST:
        assert sums[name]["status"] == "verified"
        assert sums[name]["md5"] == MNIST.md5[name]
        assert sums[name]["content_sha256"] == MNIST.content_sha256[name]
    train = sums["train-images-idx3-ubyte.gz"]
    assert set(train) == {"sha256", "md5", "content_sha256", "status"}
    if train["md5"] == MNIST.md5["train-images-idx3-ubyte.gz"]:
        pytest.skip("this data root holds the official train-images file")
    assert train["status"] == "unverified"
    clear_cache()  # the warning is issued once per process; start from a clean slate
    with pytest.warns(DataWarning, match=r"train-images-idx3-ubyte\.gz.*" + train["md5"]):
        load_dataset("mnist", "train", data_root)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        # Drop only the loaded datasets, keeping the record of warnings already issued.
        datasets._DATASET_CACHE.clear()
        load_dataset("mnist", "train", data_root)  # no second warning for the same file
    assert data_checksums("mnist", "test", data_root).keys() == set(MNIST.files["test"])


def test_fashion_mnist_verified_content(data_root: Path) -> None:
    if not (data_root / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"Fashion-MNIST not under {data_root}")
    ds = load_dataset("fashion-mnist", "test", data_root)
    assert ds.name == "fashion_mnist" and ds.images.shape == (10000, 28, 28)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    sums = data_checksums("FashionMNIST", root=data_root)
    spec = DATASETS["fashion_mnist"]
    for name, row in sums.items():
        # Debian recompressed the archives: md5 differs, uncompressed content is upstream.
        assert row["status"] in ("verified", "verified-content"), name
        assert row["content_sha256"] == spec.content_sha256[name]


def test_data_info_rows(data_root: Path, tmp_path: Path) -> None:
    rows = data_info(data_root)
    mnist = [r for r in rows if r["dataset"] == "mnist"]
    assert len(mnist) == 4 and all(r["present"] for r in mnist)
    assert {r["status"] for r in mnist} <= {"verified", "unverified"}
    assert rows[-1]["dataset"] == "affnist"
    empty = data_info(tmp_path)
    assert len(empty) == 9 and not any(r["present"] for r in empty)
    assert all(r["md5"] is None for r in empty)


def test_unpacked_files_load_and_verify_by_content(data_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST.files["test"]:
        content = gzip.decompress((data_root / "MNIST" / "raw" / name).read_bytes())
        write(raw / name.removesuffix(".gz"), content)
    ds = load_dataset("mnist", "test", tmp_path)
    assert ds.images.shape == (10000, 28, 28)
    assert [f.status for f in ds.files] == ["verified-content", "verified-content"]


def test_labels_out_of_range(data_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = MNIST.files["test"]
    shutil.copy(data_root / "MNIST" / "raw" / images, raw / images)
    content = bytearray(gzip.decompress((data_root / "MNIST" / "raw" / labels).read_bytes()))
    content[-1] = 12
    write(raw / labels, gzip.compress(bytes(content)))
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"expected labels 0\.\.9"):
        load_dataset("mnist", "test", tmp_path)


# ---------------------------------------------------------------------------------------------
# Names, roots, missing files
# ---------------------------------------------------------------------------------------------


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert resolve_data_root() == tmp_path / "datasets"
    monkeypatch.setenv(data.DATA_ENV, "elsewhere")
    assert resolve_data_root() == tmp_path / "elsewhere"
    assert resolve_data_root("explicit") == tmp_path / "explicit"
    assert resolve_data_root(tmp_path / "x").is_absolute()


def test_unknown_names() -> None:
    with pytest.raises(ConfigError, match="known datasets: fashion_mnist, mnist"):
        load_dataset("cifar10", "train")
    with pytest.raises(ConfigError, match="known splits: train, test"):
        load_dataset("mnist", "validation")
    assert data.canonical_name("FashionMNIST") == "fashion_mnist"
    assert data.canonical_name("fashion_mnist") == "fashion_mnist"


def test_missing_root_message(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", root)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(root / "MNIST" / "raw") in msg
    assert "--data-root" in msg and "CAPSBENCH_DATA=PATH" in msg
    assert "capsbench data fetch mnist" in msg
    with pytest.raises(DataError, match="--data-root"):
        data_checksums("mnist", root=root)


def test_partly_missing_names_files(data_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", raw)
    with pytest.raises(DataError, match=r"\(missing t10k-images-idx3-ubyte\.gz\); point"):
        load_dataset("mnist", "test", tmp_path)


# ---------------------------------------------------------------------------------------------
# read_idx on damaged files
# ---------------------------------------------------------------------------------------------


def test_read_idx_valid_small(tmp_path: Path) -> None:
    content = idx_bytes("images", n=3)
    expected = np.frombuffer(content, np.uint8, offset=16).reshape(3, 28, 28)
    for path in (write(tmp_path / "a.gz", gzip.compress(content)), write(tmp_path / "a", content)):
        x = read_idx(path, "images", expected_count=3)
        assert x.dtype == torch.uint8 and x.shape == (3, 28, 28)
        assert np.array_equal(x.numpy(), expected)
        x[0, 0, 0] = 1  # writable, not a view of an immutable buffer
    y = read_idx(write(tmp_path / "l.gz", gzip.compress(idx_bytes("labels", n=7))), "labels")
    assert y.shape == (7,)


def _damaged(case: str) -> tuple[str, bytes, dict, str]:
    images = idx_bytes("images", n=4)
    gz = gzip.compress(images)
    cases = {
        "truncated_gz": (gz[: len(gz) // 2], {}, "truncated or corrupt"),
        "corrupt_gz": (gz[:20] + bytes(b ^ 0xFF for b in gz[20:40]) + gz[40:], {}, "gzip"),
        "truncated_payload": (gzip.compress(images[:-10]), {}, "(truncated)"),
        "trailing_bytes": (gzip.compress(images + b"\0\0"), {}, "trailing bytes"),
        "wrong_magic": (gzip.compress(idx_bytes("labels", n=4)), {}, "magic 2051"),
        "wrong_count": (gz, {"expected_count": 5}, "expected 5 images"),
        "wrong_shape": (gzip.compress(idx_bytes("images", 4, (20, 20))), {}, "found 20x20"),
        "not_gzip": (b"<html>404 Not Found</html>", {}, "expected gzip-compressed data"),
        "empty_gz": (b"", {}, "found an empty file"),
        "short_header": (gzip.compress(images[:10]), {}, "header of 16 bytes"),
    }
    content, kwargs, needle = cases[case]
    return "train-images-idx3-ubyte.gz", content, kwargs, needle


@pytest.mark.parametrize(
    "case",
    [
        "truncated_gz",
        "corrupt_gz",
        "truncated_payload",
        "trailing_bytes",
        "wrong_magic",
        "wrong_count",
        "wrong_shape",
        "not_gzip",
        "empty_gz",
        "short_header",
    ],
)
def test_read_idx_damaged(tmp_path: Path, case: str) -> None:
    name, content, kwargs, needle = _damaged(case)
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        read_idx(path, "images", **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{path}: expected"), msg
    assert needle in msg and "found" in msg, msg


def test_read_idx_magic_message(tmp_path: Path) -> None:
    path = write(tmp_path / "x.gz", gzip.compress(idx_bytes("labels")))
    with pytest.raises(DataError) as info:
        read_idx(path, "images")
    assert str(info.value) == f"{path}: expected IDX magic 2051 (uint8 images, 3 dims), found 2049"


def test_read_idx_missing_and_empty_raw(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent.gz", "labels")
    with pytest.raises(DataError, match="a directory"):
        read_idx(tmp_path, "labels")
    path = write(tmp_path / "raw-labels", b"")
    with pytest.raises(DataError, match="found an empty file"):
        read_idx(path, "labels")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_VALID_IMAGES = idx_bytes("images", n=2, shape=(4, 3))
_VALID_LABELS = idx_bytes("labels", n=6)


def _read_or_dataerror(path: Path, kind: str) -> None:
    try:
        out = read_idx(path, kind, expected_shape=None)  # type: ignore[arg-type]
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert out.dtype == torch.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b"\x1f\x8b\x08" + b),  # gzip-looking noise
        st.binary(max_size=64).map(lambda b: b"\x00\x00\x08\x03" + b),  # IDX-looking noise
    ),
    suffix=st.sampled_from([".gz", ""]),
    kind=st.sampled_from(["images", "labels"]),
)
def test_read_idx_fuzz_random_bytes(fuzz_dir: Path, content: bytes, suffix: str, kind: str) -> None:
    _read_or_dataerror(write(fuzz_dir / f"random{suffix}", content), kind)


@settings(max_examples=150, deadline=None)
@given(
    which=st.sampled_from(["images", "labels"]),
    gz=st.booleans(),
    cut=st.floats(0, 1),
    flip=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_read_idx_fuzz_truncation(
    fuzz_dir: Path, which: str, gz: bool, cut: float, flip: int | None
) -> None:
    content = _VALID_IMAGES if which == "images" else _VALID_LABELS
    if gz:
        content = gzip.compress(content)
    content = bytearray(content[: int(len(content) * cut)])
    if flip is not None and content:
        content[flip % len(content)] ^= 0x5A
    _read_or_dataerror(write(fuzz_dir / ("cut.gz" if gz else "cut"), bytes(content)), which)


def test_file_info_on_corrupt_gz(tmp_path: Path) -> None:
    path = write(tmp_path / "t10k-labels-idx1-ubyte.gz", b"\x1f\x8b\x08\x00broken")
    info = file_info(path, MNIST, path.name)
    assert info.status == "damaged" and info.content_sha256 is None and info.size == 10
    assert info.problem.startswith("expected a complete gzip stream")


# ---------------------------------------------------------------------------------------------
# Fetching (no network on these machines)
# ---------------------------------------------------------------------------------------------


def _run_with_deadline(fn, seconds: float):  # type: ignore[no-untyped-def]
    """Run fn in a daemon thread; fail instead of hanging past ``seconds``."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed back to the test thread
            box["error"] = err

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"gave up after {seconds} s: the call hung")
    return box, time.monotonic() - start


def test_fetch_offline_real_mirrors(tmp_path: Path) -> None:
    box, elapsed = _run_with_deadline(lambda: fetch_dataset("mnist", tmp_path, timeout=3), 10)
    if "value" in box:
        pytest.skip("network available: downloaded MNIST instead of failing")
    err = box["error"]
    assert isinstance(err, DataError), repr(err)
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith("cannot download MNIST (no network: ")
    assert msg.endswith(
        "point the data root at local files with --data-root PATH or CAPSBENCH_DATA=PATH"
    )
    assert elapsed < 10
    assert not any((tmp_path / "MNIST" / "raw").iterdir())  # no partial files left behind


def test_fetch_unreachable_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 on localhost is closed: a real, deterministic connection failure, whether or not
    # the machine running the tests has internet access.
    spec = dataclasses.replace(MNIST, mirrors=("http://127.0.0.1:9/", "http://127.0.0.1:9/b/"))
    monkeypatch.setitem(DATASETS, "mnist", spec)
    box, _ = _run_with_deadline(lambda: fetch_dataset("mnist", tmp_path, timeout=3), 10)
    assert isinstance(box.get("error"), DataError)
    assert str(box["error"]).startswith("cannot download MNIST (no network: ")


def test_fetch_skips_present_files(data_root: Path) -> None:
    assert fetch_dataset("mnist", data_root, timeout=1) == []


def test_fetch_unwritable_root(tmp_path: Path) -> None:
    blocker = write(tmp_path / "a-file", b"x")
    root = blocker / "root"  # a folder under a regular file can never be created
    with pytest.raises(DataError, match=re.escape(f"cannot write to data root {root}")):
        fetch_dataset("mnist", root, timeout=1)


def test_ensure_dataset_without_download(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(DataError, match="--data-root"):
        data.ensure_dataset("mnist", tmp_path, download=False)
    ds = data.ensure_dataset("mnist", data_root, download=True, split="test")
    assert ds.images.shape == (10000, 28, 28)


# ---------------------------------------------------------------------------------------------
# affNIST
# ---------------------------------------------------------------------------------------------


def _affnist_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 40, 40), dtype=np.uint8)
    images[:, 0, :] = 255  # a full top row and an empty left column: not transpose-symmetric
    images[:, 1:, 0] = 0
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    return images, labels


def _save_affnist(path: Path, images: np.ndarray, labels: np.ndarray, **extra: object) -> Path:
    # Real-file layout: one image per column, row-major within the column (see the reader).
    columns = images.reshape(len(images), 1600).T
    struct = {"image": columns, "label_int": labels[None, :], **extra}
    scipy.io.savemat(path, {"affNISTdata": struct})
    return path


def test_affnist_column_orientation_matches_matlab() -> None:
    images, _ = _affnist_images(2)
    columns = images.reshape(2, 1600).T
    # The official MATLAB reader: reshape(col, 40, 40)' (column-major reshape, transpose).
    matlab = np.stack([columns[:, i].reshape(40, 40, order="F").T for i in range(2)])
    assert np.array_equal(affnist_columns_to_images(columns), matlab)
    assert np.array_equal(affnist_columns_to_images(columns), images)


def test_affnist_roundtrip(tmp_path: Path) -> None:
    images, labels = _affnist_images(5)
    path = _save_affnist(tmp_path / "test.mat", images, labels, label_one_of_n=np.eye(10)[:, :5])
    x, y = read_affnist_mat(path)
    assert x.dtype == torch.uint8 and x.shape == (5, 40, 40)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert np.array_equal(x.numpy(), images)
    assert (x[:, 0, :] == 255).all()  # top row stayed the top row


def test_affnist_batches(tmp_path: Path) -> None:
    batches = tmp_path / "affNIST" / "test_batches"
    batches.mkdir(parents=True)
    assert find_affnist(tmp_path) is None and load_affnist_test(tmp_path) is None
    parts = {}
    for i in (1, 2, 10):
        parts[i] = _affnist_images(3, seed=i)
        _save_affnist(batches / f"{i}.mat", *parts[i])
    found = find_affnist(tmp_path)
    assert [p.name for p in found or []] == ["1.mat", "2.mat", "10.mat"]
    result = load_affnist_test(tmp_path)
    assert result is not None
    x, y, files = result
    assert x.shape == (9, 40, 40) and y.shape == (9,)
    assert np.array_equal(x[6:].numpy(), parts[10][0])
    assert [Path(f["path"]).name for f in files] == ["1.mat", "2.mat", "10.mat"]
    assert all(f["status"] == "unverified" and len(f["sha256"]) == 64 for f in files)
    row = data_info(tmp_path)[-1]
    assert row["dataset"] == "affnist" and row["present"]
    _save_affnist(tmp_path / "affNIST" / "test.mat", *_affnist_images(1))
    assert [p.name for p in find_affnist(tmp_path) or []] == ["test.mat"]


def test_affnist_float_pixels_accepted(tmp_path: Path) -> None:
    images, labels = _affnist_images(2)
    path = tmp_path / "f.mat"
    scipy.io.savemat(
        path,
        {
            "affNISTdata": {
                "image": images.reshape(2, 1600).T.astype(float),
                "label_int": labels.astype(float)[None, :],
            }
        },
    )
    x, y = read_affnist_mat(path)
    assert np.array_equal(x.numpy(), images) and y.tolist() == labels.tolist()


def _bad_mat(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.mat"
    images, labels = _affnist_images(3)
    columns = images.reshape(3, 1600).T
    if case == "random_bytes":
        path.write_bytes(np.random.default_rng(1).bytes(500))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "wrong_key":
        scipy.io.savemat(path, {"images": columns})
    elif case == "not_struct":
        scipy.io.savemat(path, {"affNISTdata": columns})
    elif case == "no_labels":
        scipy.io.savemat(path, {"affNISTdata": {"image": columns}})
    elif case == "wrong_image_shape":
        scipy.io.savemat(path, {"affNISTdata": {"image": columns[:784], "label_int": labels}})
    elif case == "label_count":
        scipy.io.savemat(path, {"affNISTdata": {"image": columns, "label_int": labels[:2]}})
    elif case == "label_range":
        _save_affnist(path, images, np.array([1, 2, 11], np.uint8))
    elif case == "fractional_pixels":
        scipy.io.savemat(
            path, {"affNISTdata": {"image": columns / 3.0, "label_int": labels[None, :]}}
        )
    return path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("random_bytes", "expected a MATLAB v5 .mat file, found no MAT-file header"),
        ("empty", "expected a MATLAB"),
        ("wrong_key", "expected variable 'affNISTdata'"),
        ("not_struct", "1x1 struct"),
        ("no_labels", "expected field 'label_int'"),
        ("wrong_image_shape", "expected 'image' of shape (1600, N)"),
        ("label_count", "expected 'label_int' of shape (1, 3)"),
        ("label_range", "expected labels 0..9"),
        ("fractional_pixels", "expected uint8 pixels"),
    ],
)
def test_affnist_bad_files(tmp_path: Path, case: str, needle: str) -> None:
    path = _bad_mat(tmp_path, case)
    with pytest.raises(DataError) as info:
        read_affnist_mat(path)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)


def test_affnist_truncated_mat(tmp_path: Path) -> None:
    good = _save_affnist(tmp_path / "good.mat", *_affnist_images(4))
    buf = good.read_bytes()
    for cut in (10, 100, 128, 200, len(buf) // 2, len(buf) - 1):
        path = write(tmp_path / f"cut{cut}.mat", buf[:cut])
        with pytest.raises(DataError, match=re.escape(str(path))):
            read_affnist_mat(path)
    with pytest.raises(DataError, match="no such file"):
        read_affnist_mat(tmp_path / "absent.mat")


def test_affnist_compressed_roundtrip_and_truncation(tmp_path: Path) -> None:
    images, labels = _affnist_images(4)
    path = tmp_path / "z.mat"
    columns = images.reshape(4, 1600).T
    struct = {"image": columns, "label_int": labels[None, :]}
    scipy.io.savemat(path, {"affNISTdata": struct}, do_compression=True)  # MATLAB's -v7 default
    x, _ = read_affnist_mat(path)
    assert np.array_equal(x.numpy(), images)
    cut = write(tmp_path / "zcut.mat", path.read_bytes()[:-30])
    with pytest.raises(DataError, match="truncated"):
        read_affnist_mat(cut)


def _patched(good: bytes, needle: bytes, offset: int, value: int) -> tuple[bytes, int]:
    at = good.index(needle) + offset
    bad = bytearray(good)
    bad[at] = value
    return bytes(bad), good.index(needle)


def test_affnist_bad_element_type_does_not_crash(tmp_path: Path) -> None:
    # scipy's v5 reader segfaults on an element type code it has no dtype for (scipy PR
    # #25349); the pre-check must turn that into a DataError. Patch the type of the image
    # data element (uint8 = type 2, 1600*2 bytes) to 8, an unused code.
    good = _save_affnist(tmp_path / "good.mat", *_affnist_images(2)).read_bytes()
    le = "little"
    bad, at = _patched(good, (2).to_bytes(4, le) + (3200).to_bytes(4, le), 0, 8)
    path = write(tmp_path / "bad.mat", bad)
    with pytest.raises(DataError, match=f"data element at offset {at}, found element type 8"):
        read_affnist_mat(path)


def test_affnist_complex_flag_does_not_crash(tmp_path: Path) -> None:
    # Setting the "complex" flag of a field makes scipy read an "imaginary part" past the end
    # of that array: from the next array (which crashed scipy 1.17 in fuzzing) or, here,
    # past the end of the file. Either way the pre-check must report a DataError.
    good = _save_affnist(tmp_path / "good.mat", *_affnist_images(2)).read_bytes()
    le = "little"
    # The label_int field's array flags: miUINT32 tag (6, 8) then class 9 (uint8), flags 0.
    flags = (6).to_bytes(4, le) + (8).to_bytes(4, le) + (9).to_bytes(4, le)
    first = good.index(flags)
    bad = bytearray(good)
    bad[good.index(flags, first + 1) + 9] |= 0x08  # complex bit (bit 11 of the flags word)
    path = write(tmp_path / "bad.mat", bytes(bad))
    with pytest.raises(DataError, match=r"damaged \.mat file"):
        read_affnist_mat(path)


def test_affnist_v73_header(tmp_path: Path) -> None:
    header = b"MATLAB 7.3 MAT-file".ljust(124, b" ") + (0x0200).to_bytes(2, "little") + b"IM"
    path = write(tmp_path / "v73.mat", header + bytes(512))
    with pytest.raises(DataError, match=r"v7\.3 \(HDF5\)"):
        read_affnist_mat(path)


def test_affnist_empty_fields(tmp_path: Path) -> None:
    # Empty fields must fail with a DataError, not an IndexError from the shape checks.
    path = tmp_path / "cell.mat"
    scipy.io.savemat(path, {"affNISTdata": {"image": np.empty((0, 0)), "label_int": []}})
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_affnist_mat(path)


def _valid_mat_bytes(compressed: bool) -> bytes:
    images, labels = _affnist_images(2, seed=1)
    buf = io.BytesIO()
    struct = {"image": images.reshape(2, 1600).T, "label_int": labels[None, :]}
    scipy.io.savemat(buf, {"affNISTdata": struct}, do_compression=compressed)
    return buf.getvalue()


_VALID_MAT = {False: _valid_mat_bytes(False), True: _valid_mat_bytes(True)}


def _read_mat_or_dataerror(path: Path) -> None:
    try:
        x, y = read_affnist_mat(path)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert x.dtype == torch.uint8 and x.shape[1:] == (40, 40) and y.shape == (x.shape[0],)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=300).map(lambda b: _VALID_MAT[False][:128] + b),  # a real header, then noise
    )
)
def test_read_affnist_mat_fuzz_random_bytes(fuzz_dir: Path, content: bytes) -> None:
    _read_mat_or_dataerror(write(fuzz_dir / "random.mat", content))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    compressed=st.booleans(),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=4),
)
def test_read_affnist_mat_fuzz_truncation_and_flips(
    fuzz_dir: Path, compressed: bool, cut: float, flips: list[tuple[int, int]]
) -> None:
    good = _VALID_MAT[compressed]
    content = bytearray(good[: max(0, int(len(good) * cut))] if cut < 1 else good)
    for at, mask in flips:
        if content:
            content[at % len(content)] ^= mask
    _read_mat_or_dataerror(write(fuzz_dir / "mutated.mat", bytes(content)))
