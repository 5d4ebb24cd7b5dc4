"""CLI checks from a QA pass: damaged data files, what `data fetch` reports, data roots that
are not folders, conflicting flags and ``--version``.

Every case runs :func:`capsbench.cli.main.main` on real files: damaged data is a copy of the real
MNIST files under a temporary data root, damaged there; downloads come from a local HTTP
server (serving the real files) or a closed local port, so the tests behave the same with or
without internet access.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import importlib.metadata
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import capsbench
from capsbench.cli.main import build_parser, main
from capsbench.data.datasets import DataWarning, load_dataset
from capsbench.data.specs import DATASETS
from capsbench.errors import DataError

TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"


def copy_mnist(data_root: Path, root: Path, names: tuple[str, ...] | None = None) -> Path:
    """Copy the real MNIST files (all, or ``names``) to ``root``; return the copy's raw folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names or DATASETS["mnist"].filenames():
        shutil.copyfile(data_root / "MNIST" / "raw" / name, raw / name)
    return raw


def rewrite_gz(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Decompress ``path``, apply ``edit`` to the IDX bytes, compress it back (valid gzip)."""
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes())), mtime=0))


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI; return (exit code, stdout, stderr). argparse's exits count as returns."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0], err
    return lines[0]


def line_of(out: str, filename: str) -> str:
    """The ``data info`` line of an MNIST file."""
    found = [line for line in out.splitlines() if line.split()[:1] == ["mnist"] and filename in line]
    assert len(found) == 1, out
    return found[0]


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """MNIST's mirrors become a closed local port: every download fails as it does offline."""
    spec = dataclasses.replace(DATASETS["mnist"], mirrors=("http://127.0.0.1:9/",))
    monkeypatch.setitem(DATASETS, "mnist", spec)


@pytest.fixture
def mirror(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A local HTTP server that serves the real MNIST files as MNIST's only mirror.

    Yields the list of paths requested from it.
    """
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requested.append(self.path)

    handler = functools.partial(Handler, directory=str(data_root / "MNIST" / "raw"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], mirrors=(url,)))
    try:
        yield requested
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- damaged data files


def test_data_info_shows_a_damaged_file(data_root: Path, tmp_path: Path, capsys) -> None:
    # The QA report's case: 8 bytes of text in place of the test labels.
    raw = copy_mnist(data_root, tmp_path / "data")
    (raw / TEST_LABELS).write_bytes(b"garbage\n")
    rc, out, err = call(["data", "info", "--data-root", str(tmp_path / "data")], capsys)
    assert rc == 0 and err == ""
    line = line_of(out, TEST_LABELS)
    assert "damaged: expected gzip-compressed data (.gz), found 8 bytes" in line, line
    assert "unverified" not in line and str(raw) not in line  # the reason, not the path again
    # The known reconstruction of the training images passes the checks: not damaged.
    assert "damaged" not in line_of(out, TRAIN_IMAGES) and "unverified" in line_of(out, TRAIN_IMAGES)
    assert " verified " in line_of(out, TEST_IMAGES)
    assert f"mnist: 1 damaged file(s); copy good ones in their place, or run 'capsbench data fetch mnist " \
           f"--data-root {tmp_path / 'data'}' when online" in out


@pytest.mark.parametrize(
    "edit, needle",
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:1000]), "expected a complete gzip stream",
                     id="truncated_gzip"),
        pytest.param(lambda p: rewrite_gz(p, lambda b: (2051).to_bytes(4, "big") + b[4:]),
                     "expected IDX magic 2049", id="wrong_magic"),
        pytest.param(lambda p: rewrite_gz(p, lambda b: b[:4] + (9999).to_bytes(4, "big") + b[8:]),
                     "expected 10000 labels in the IDX header, found 9999", id="wrong_count"),
        pytest.param(lambda p: rewrite_gz(p, lambda b: b[:-5]), "found 9995 (truncated)", id="short_payload"),
        pytest.param(lambda p: rewrite_gz(p, lambda b: b[:-1] + bytes([10])), "expected labels 0..9, found 10",
                     id="label_out_of_range"),
    ],
)
def test_data_info_names_the_damage(edit, needle, data_root: Path, tmp_path: Path, capsys) -> None:
    raw = copy_mnist(data_root, tmp_path, (TEST_IMAGES, TEST_LABELS))
    edit(raw / TEST_LABELS)
    rc, out, _ = call(["data", "info", "--data-root", str(tmp_path)], capsys)
    assert rc == 0
    assert "damaged: " in line_of(out, TEST_LABELS) and needle in line_of(out, TEST_LABELS), out
    # ... and it is the loader's own check: loading the split fails with the same words.
    with pytest.raises(DataError, match=re.escape(needle)), warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # an unknown checksum is warned of first
        load_dataset("mnist", "test", tmp_path)


def test_data_info_keeps_an_intact_unknown_copy_unverified(data_root: Path, tmp_path: Path, capsys) -> None:
    # A valid file whose content matches no known checksum is unverified, not damaged.
    raw = copy_mnist(data_root, tmp_path, (TEST_IMAGES, TEST_LABELS))
    rewrite_gz(raw / TEST_LABELS, lambda b: b[:-1] + bytes([(b[-1] + 1) % 10]))
    rc, out, _ = call(["data", "info", "--data-root", str(tmp_path)], capsys)
    assert rc == 0
    assert "unverified" in line_of(out, TEST_LABELS) and "damaged:" not in out


def test_fetch_replaces_a_damaged_file(data_root: Path, tmp_path: Path, mirror: list[str], capsys) -> None:
    raw = copy_mnist(data_root, tmp_path)
    (raw / TEST_LABELS).write_bytes(b"garbage\n")
    rc, out, err = call(["data", "fetch", "mnist", "--data-root", str(tmp_path)], capsys)
    assert rc == 0, err
    assert out == f"mnist: 4 files present under {tmp_path} (1 downloaded now, 3 already there)\n"
    assert mirror == [f"/{TEST_LABELS}"]  # only the damaged file was downloaded
    assert (raw / TEST_LABELS).read_bytes() == (data_root / "MNIST" / "raw" / TEST_LABELS).read_bytes()
    assert sorted(p.name for p in raw.iterdir()) == sorted(DATASETS["mnist"].filenames())  # no temp files
    rc, out, _ = call(["data", "info", "--data-root", str(tmp_path)], capsys)
    assert " verified " in line_of(out, TEST_LABELS) and "damaged:" not in out


def test_fetch_offline_keeps_the_damaged_file_and_says_why(data_root: Path, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    offline(monkeypatch)
    raw = copy_mnist(data_root, tmp_path)
    (raw / TEST_LABELS).write_bytes(b"garbage\n")
    rc, out, err = call(["data", "fetch", "mnist", "--data-root", str(tmp_path)], capsys)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    for needle in (str(raw / TEST_LABELS), "is damaged (expected gzip-compressed data",
                   "cannot download MNIST (no network: ", "--data-root PATH"):
        assert needle in line, line
    assert (raw / TEST_LABELS).read_bytes() == b"garbage\n"
    assert sorted(p.name for p in raw.iterdir()) == sorted(DATASETS["mnist"].filenames())


def test_fetch_on_a_complete_root_counts_the_files_present(data_root: Path, capsys) -> None:
    rc, out, err = call(["data", "fetch", "mnist", "--data-root", str(data_root)], capsys)
    assert rc == 0 and err == ""
    assert out == f"mnist: 4 files present under {data_root} (0 downloaded now, 4 already there)\n"


# ----------------------------------------------------------------------------- data roots


@pytest.mark.parametrize("action", ["info", "fetch"])
def test_data_commands_refuse_a_root_that_does_not_exist(action: str, tmp_path: Path, capsys) -> None:
    nowhere = tmp_path / "no-such-root"
    rc, out, err = call(["data", action, "--data-root", str(nowhere)], capsys)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert f"data root {nowhere} (from --data-root) does not exist" in line and "point --data-root at" in line
    assert not nowhere.exists()


def test_data_info_refuses_a_missing_root_from_the_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    nowhere = tmp_path / "no-such-root"
    monkeypatch.setenv("CAPSBENCH_DATA", str(nowhere))
    rc, out, err = call(["data", "info"], capsys)
    assert rc == 2 and out == ""
    assert "CAPSBENCH_DATA" in one_error_line(err) and "does not exist" in err


@pytest.mark.parametrize("argv", [["data", "info"], ["train", "--model", "lenet5", "--device", "cpu"]],
                         ids=["data_info", "train"])
def test_a_root_that_is_a_file_gets_folder_advice(argv: list[str], tmp_path: Path, capsys) -> None:
    not_a_folder = tmp_path / "mnist.tar.gz"
    not_a_folder.write_bytes(b"an archive, not a folder")
    rc, _, err = call([*argv, "--data-root", str(not_a_folder), "--out", str(tmp_path / "runs")]
                      if argv[0] == "train" else [*argv, "--data-root", str(not_a_folder)], capsys)
    line = one_error_line(err)
    assert rc == 2 and "is a file, not a folder; point --data-root at the folder" in line, line
    assert "create it" not in line and "data fetch" not in line, line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- flags


def test_epochs_and_steps_are_mutually_exclusive(tmp_path: Path, capsys) -> None:
    rc, out, err = call(["train", "--model", "lenet5", "--epochs", "1", "--steps", "5",
                         "--out", str(tmp_path / "runs")], capsys)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert "--steps" in line and "not allowed with" in line and "--epochs" in line, line
    assert not (tmp_path / "runs").exists()
    # Each alone is still accepted.
    parser = build_parser()
    assert parser.parse_args(["train", "--model", "lenet5", "--steps", "5"]).steps == 5
    assert parser.parse_args(["train", "--model", "lenet5", "--epochs", "1.5"]).epochs == 1.5


@pytest.mark.parametrize("argv", [["train", "--model", "lenet5"], ["run", "--suite", "rotation", "--models", "lenet5"]],
                         ids=["train", "run"])
def test_device_options_refused_before_any_work(argv: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    # The data root holds no MNIST and downloads fail: had the command looked at the data (or
    # created --out) before the options, it would stop on that instead.
    offline(monkeypatch)
    (tmp_path / "empty-root").mkdir()
    out_dir = tmp_path / "runs"
    rc, out, err = call([*argv, "--amp", "bf16", "--device", "cpu",
                         "--data-root", str(tmp_path / "empty-root"), "--out", str(out_dir)], capsys)
    assert rc == 2 and out == ""
    assert "--amp bf16 needs a CUDA device" in one_error_line(err)
    assert not out_dir.exists() and not any((tmp_path / "empty-root").iterdir())


def test_version(capsys) -> None:
    rc, out, err = call(["--version"], capsys)
    assert rc == 0 and err == ""
    assert out == f"capsbench {importlib.metadata.version('capsbench')}\n"


def test_version_falls_back_to_the_package_attribute(monkeypatch, capsys) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(capsbench, "__version__", "9.9.9.dev0")
    rc, out, _ = call(["--version"], capsys)
    assert rc == 0 and out == "capsbench 9.9.9.dev0\n"
