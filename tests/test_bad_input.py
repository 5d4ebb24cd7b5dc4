"""Bad input (issue #7): one clear line on stderr, exit code 2, nothing lost, before any work.

Every case runs the real ``capsbench`` command: the data and output mistakes in a subprocess
(so stray warnings or tracebacks on stderr are seen exactly as a user sees them; they run
concurrently to keep this file quick), the name and number mistakes in-process through
:func:`capsbench.cli.main.main`, which is what the console script calls. Damaged data files are
built from the real MNIST files under the data root; nothing is mocked.

Each failing command points at an output folder that already holds a finished run and the
training job it would reuse; that folder (and the data) must be byte-for-byte unchanged
afterwards, with nothing created or removed.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from capsbench.cli.main import main
from capsbench.train.config import TrainConfig

# What a command that trains would use: the cheapest model and profile, so that a check that
# regressed to "after training" costs seconds, not minutes.
TRAIN = ["train", "--model", "lenet5", "--profile", "smoke", "--device", "cpu", "--no-progress"]
RUN = ["run", "--models", "lenet5", "--profile", "smoke", "--device", "cpu", "--no-progress"]
ROTATION = [*RUN, "--suite", "rotation"]
AFFNIST = [*RUN, "--suite", "affnist"]

ERROR_LINE = re.compile(r"^capsbench(?: [a-z]+)?: error: \S")

# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """``folder`` and every entry under it by relative path: (mode, mtime_ns, content) of a
    file, (mode, 0, b"") of a folder (whose mtime a write-permission probe may change)."""
    out = {}
    for p in [folder, *sorted(folder.rglob("*"))]:
        st = p.lstat()
        is_file = p.is_file()
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_mtime_ns if is_file else 0,
                                           p.read_bytes() if is_file else b"")
    return out


def make_prior_run(out: Path) -> Path:
    """An output folder holding a finished rotation run and the smoke lenet5 jobs it used.

    The job folders have the names the failing commands would train into (same model,
    profile and seed), so a command that got as far as training would touch them.
    """
    run_dir = out / "rotation-smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "results.csv").write_text("model,seed,cell,metric,value\nlenet5,0,rot+0,accuracy,0.5\n")
    (run_dir / "run.json").write_text('{"status": "finished"}\n')
    for protocol in ("mnist28_shift2", "canvas40_random"):
        job = out / "jobs" / TrainConfig(model="lenet5", profile="smoke", protocol=protocol).job_name
        job.mkdir(parents=True)
        (job / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
        (job / "job.json").write_text('{"status": "finished"}\n')
    return out


def copy_mnist(data_root: Path, root: Path) -> Path:
    """Copy the real MNIST files to ``root``; return the copy's raw folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in sorted((data_root / "MNIST" / "raw").glob("*.gz")):
        shutil.copyfile(f, raw / f.name)
    return raw


def rewrite_gz(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Decompress ``path``, apply ``edit`` to the IDX bytes, compress it back (valid gzip)."""
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes())), mtime=0))


def save_affnist_like(path: Path, **variables: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables)


def assert_one_line_error(rc: int, stderr: str, *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr, an error naming every needle."""
    assert rc == 2, f"exit code {rc}, stderr:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert "Traceback" not in stderr and "warning" not in line.lower(), stderr
    assert ERROR_LINE.match(line), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    return line


def offline_env() -> dict[str, str]:
    """The environment with every download refused at once (a closed local port as proxy).

    A data root without MNIST makes capsbench try to download it; this makes that attempt
    fail the same way on a machine with internet access as on one without.
    """
    env = dict(os.environ)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    for var in ("no_proxy", "NO_PROXY", "CAPSBENCH_DEBUG"):
        env.pop(var, None)
    return env


# ----------------------------------------------------------------------------- subprocess cases


@dataclass
class Case:
    """One failing ``capsbench`` invocation, run in a subprocess."""

    argv: list[str]
    needles: list[str]  # what the one error line must name (the thing and the fix)
    watch: list[Path]  # folders that must come out unchanged
    result: tuple[int, str, str, float] | None = None  # rc, stdout, stderr, seconds
    before: list[dict] | None = None


def _read_only_dir(base: Path) -> tuple[Path, Callable[[], None]] | None:
    """A folder in which no file can be created, and a function that undoes the setup.

    A folder without write permission, except for root (who ignores permissions): then a
    kernel file system that refuses new files.
    """
    ro = base / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        os.close(os.open(ro / "probe", os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError:
        return ro, lambda: ro.chmod(0o755)
    (ro / "probe").unlink()
    ro.chmod(0o755)
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate, lambda: None
        os.close(fd)
        os.unlink(name)
    return None  # running as root without /sys or /proc: nothing here refuses new files


@pytest.fixture(scope="module")
def cases(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Build every subprocess case, run them all (three at a time), yield them by name."""
    base = tmp_path_factory.mktemp("bad-input")
    roots = base / "roots"
    made: dict[str, Case] = {}

    def add(name: str, argv: list[str], needles: list[str], watch: tuple[Path, ...] = ()) -> None:
        out = make_prior_run(base / "out" / name)
        argv = [*argv, "--out", str(out)] if "--out" not in argv else argv
        made[name] = Case(argv, needles, [out, *watch])

    # 1. missing data root: a folder that does not exist, and one without MNIST in it
    nowhere = roots / "does-not-exist"
    add("missing_root", [*TRAIN, "--data-root", str(nowhere)], [str(nowhere), "does not exist", "--data-root"])
    empty = roots / "empty"
    empty.mkdir(parents=True)
    add("root_without_mnist", [*ROTATION, "--data-root", str(empty)],
        [str(empty / "MNIST" / "raw"), "not found", "--data-root PATH"], (empty,))

    # 2. a truncated .gz (the test images, cut in half)
    raw = copy_mnist(data_root, roots / "truncated")
    gz = raw / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    add("truncated_gz", [*ROTATION, "--data-root", str(roots / "truncated")],
        [str(gz), "truncated", "delete the file"], (roots / "truncated",))

    # 3. IDX files: wrong magic; labels count != images count; header count > data
    raw = copy_mnist(data_root, roots / "magic")
    rewrite_gz(raw / "t10k-labels-idx1-ubyte.gz", lambda d: (2051).to_bytes(4, "big") + d[4:])
    add("wrong_magic", [*TRAIN, "--data-root", str(roots / "magic")],
        [str(raw / "t10k-labels-idx1-ubyte.gz"), "magic 2049", "found 2051", "delete it"], (roots / "magic",))
    # train labels: 59,999 labels (consistent header) for 60,000 images. Read right after the
    # unverified training images of the shared copy, so their warning must not show either.
    raw = copy_mnist(data_root, roots / "count")
    rewrite_gz(raw / "train-labels-idx1-ubyte.gz", lambda d: d[:4] + (59999).to_bytes(4, "big") + d[8:-1])
    add("label_count", [*TRAIN, "--data-root", str(roots / "count")],
        [str(raw / "train-labels-idx1-ubyte.gz"), "expected 60000 labels", "found 59999", "delete it"],
        (roots / "count",))
    raw = copy_mnist(data_root, roots / "short")
    rewrite_gz(raw / "t10k-images-idx3-ubyte.gz", lambda d: d[:-784])  # header still says 10,000
    add("header_count_exceeds_data", [*ROTATION, "--data-root", str(roots / "short")],
        [str(raw / "t10k-images-idx3-ubyte.gz"), "10000 images", "(truncated)", "delete it"],
        (roots / "short",))

    # 4. affNIST: a corrupt .mat, and a valid MATLAB file without affNISTdata
    copy_mnist(data_root, roots / "mat-corrupt")
    mat = roots / "mat-corrupt" / "affNIST" / "test.mat"
    images = np.random.default_rng(0).integers(0, 256, (1600, 4), dtype=np.uint8)
    save_affnist_like(mat, affNISTdata={"image": images, "label_int": np.arange(4, dtype=np.uint8)[None]})
    good = mat.read_bytes()
    mat.write_bytes(good[:128] + bytes(b ^ 0xA5 for b in good[128:160]) + good[160:])  # damage the data
    add("affnist_corrupt", [*AFFNIST, "--data-root", str(roots / "mat-corrupt")],
        [str(mat), ".mat", "replace it", "affnist_synth"], (roots / "mat-corrupt",))
    copy_mnist(data_root, roots / "mat-nokey")
    mat = roots / "mat-nokey" / "affNIST" / "test.mat"
    save_affnist_like(mat, images=images)
    add("affnist_without_key", [*AFFNIST, "--data-root", str(roots / "mat-nokey")],
        [str(mat), "'affNISTdata'", "found ['images']", "replace it"], (roots / "mat-nokey",))

    # 7. an output folder that cannot be written: an existing file, and under a read-only folder
    blocker = base / "a-file"
    blocker.write_text("not a folder\n")
    add("out_is_a_file", [*ROTATION, "--data-root", str(data_root), "--out", str(blocker)],
        [str(blocker), "existing file", "--out DIR"])
    made["out_is_a_file"].watch.append(blocker)
    read_only = _read_only_dir(base)
    undo = read_only[1] if read_only else (lambda: None)
    if read_only:
        ro = read_only[0]
        target = ro / "capsbench-test-out" / "runs"
        add("out_read_only", [*TRAIN, "--data-root", str(data_root), "--out", str(target)],
            [str(target), "not writable", "--out DIR"])
        if ro.is_relative_to(base):
            made["out_read_only"].watch.append(ro)

    # --debug: the same one line last, after the traceback
    add("debug", ["--debug", *ROTATION, "--data-root", str(roots / "truncated")], [str(gz), "truncated"])

    env = offline_env()

    def run(case: Case) -> None:
        case.before = [snapshot(p) for p in case.watch]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "capsbench", *case.argv], capture_output=True,
                              text=True, timeout=300, cwd=base, env=env)
        case.result = (proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)

    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(run, made.values()))
        yield made
    finally:
        undo()


SUBPROCESS_CASES = [
    "missing_root",
    "root_without_mnist",
    "truncated_gz",
    "wrong_magic",
    "label_count",
    "header_count_exceeds_data",
    "affnist_corrupt",
    "affnist_without_key",
    "out_is_a_file",
    "out_read_only",
]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(cases: dict[str, Case], name: str) -> None:
    if name not in cases:  # only "out_read_only", as root on a system without /sys and /proc
        pytest.skip("no folder here refuses new files, so there is no read-only --out to try")
    case = cases[name]
    assert case.result is not None
    rc, stdout, stderr, seconds = case.result
    assert_one_line_error(rc, stderr, *case.needles)
    assert stdout == "", stdout  # no progress, no training log: it stopped before any work
    for folder, before in zip(case.watch, case.before or [], strict=True):
        assert snapshot(folder) == before, f"{folder} changed"
    # Generous even with three at a time on a busy 2-core machine; each would take seconds
    # alone (importing torch, reading the test set). Training and scoring take longer.
    assert seconds < 60


def test_debug_shows_the_traceback(cases: dict[str, Case]) -> None:
    rc, stdout, stderr, _ = cases["debug"].result or (None, "", "", 0)
    assert rc == 2 and stdout == ""
    assert stderr.startswith("Traceback (most recent call last):"), stderr
    assert "DataError" in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert ERROR_LINE.match(last) and all(n in last for n in cases["debug"].needles), last


def test_failed_download_leaves_no_folders(cases: dict[str, Case]) -> None:
    # The download that a root without MNIST triggers failed: it leaves no empty folders behind.
    empty = Path(cases["root_without_mnist"].argv[cases["root_without_mnist"].argv.index("--data-root") + 1])
    assert empty.is_dir() and not any(empty.iterdir())
    nowhere = Path(cases["missing_root"].argv[cases["missing_root"].argv.index("--data-root") + 1])
    assert not nowhere.exists()


# ----------------------------------------------------------------------------- in-process cases


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Call the CLI entry point; argparse errors exit (SystemExit), the others return 2."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    assert captured.out == ""
    return rc, captured.err


@pytest.fixture
def prior_run(tmp_path: Path) -> Path:
    return make_prior_run(tmp_path / "runs")


@pytest.mark.parametrize(
    "argv, needles",
    [
        # 5. unknown names: the message lists the valid ones
        pytest.param([*TRAIN, "--dataset", "cifar10"], ["--dataset", "'cifar10'", "'mnist'", "'fashion_mnist'"],
                     id="dataset"),
        pytest.param([*TRAIN, "--protocol", "shift2"], ["'shift2'", "known training protocols:", "mnist28_shift2"],
                     id="protocol"),
        pytest.param([*RUN, "--suite", "rotation", "--models", "lenet5,capsnet_r3"],
                     ["'capsnet_r3'", "--models", "known models:", "capsnet_r1", "lenet5"], id="run_models"),
        pytest.param([*RUN, "--suite", "rotaton"], ["'rotaton'", "known suites:", "rotation", "affnist"], id="suite"),
        pytest.param([*RUN, "--suite", "rotation", "--profile", "fast"],
                     ["'fast'", "known profiles:", "paper, quick, smoke"], id="run_profile"),
        pytest.param(["profile", "--models", "lenet", "--device", "cpu"], ["'lenet'", "known models:", "lenet5"],
                     id="profile_models"),
        pytest.param(["list", "model"], ["'model'", "'models'", "'suites'"], id="list_what"),
        pytest.param(["speed", "--model", "capsnett", "--device", "cpu"], ["'capsnett'", "known models:", "capsnet_r1"],
                     id="speed_model"),
        pytest.param(["speed", "--variants", "fp32,fp16", "--device", "cpu"],
                     ["'fp16'", "fp32, fp32_cl, bf16, bf16_cl, bf16_cl_graph, bf16_cl_compile"], id="speed_variant"),
        pytest.param([*TRAIN, "--cuda-graph", "--device", "cpu"], ["--cuda-graph", "CUDA device"], id="train_cuda_graph"),
        pytest.param(["report", "runs/rotation-quick", "--metrics", "accuracy,acuracy"],
                     ["'acuracy'", "--metrics", "valid metrics: accuracy, confidence, unchanged"], id="report_metric"),
        # 6. invalid numbers: the message names the option and what it must be
        pytest.param([*TRAIN, "--epochs", "0"], ["--epochs", "> 0", "got 0"], id="epochs_zero"),
        pytest.param([*TRAIN, "--epochs", "inf"], ["--epochs", "finite number > 0", "got inf"], id="epochs_inf"),
        pytest.param([*TRAIN, "--batch-size", "-1"], ["--batch-size", "whole number >= 1", "got -1"],
                     id="batch_size_negative"),
        pytest.param([*TRAIN, "--steps", "0"], ["--steps", "whole number >= 1", "got 0"], id="steps_zero"),
        pytest.param([*TRAIN, "--seed", "-1"], ["--seed", "whole number >= 0", "got -1"], id="seed_negative"),
        pytest.param([*ROTATION, "--seeds", "0"],
                     ["--seeds", "expected a whole number >= 1, got 0", "capsbench run --help"], id="seeds_zero"),
        pytest.param([*ROTATION, "--seeds", "two"], ["--seeds", "whole number >= 1", "'two'"], id="seeds_text"),
        pytest.param([*ROTATION, "--match-accuracy", "1.5"], ["--match-accuracy", "(0, 1)", "1.5"],
                     id="match_accuracy_above_1"),
        pytest.param([*AFFNIST, "--match-accuracy", "1"], ["--match-accuracy", "validation", "(0, 1)"],
                     id="match_accuracy_one"),
        pytest.param([*AFFNIST, "--match-accuracy", "99.2"], ["--match-accuracy", "pass 0.992"],
                     id="match_accuracy_percent"),
        pytest.param(["profile", "--models", "lenet5", "--batch-sizes", "1,0", "--device", "cpu"],
                     ["--batch-sizes", ">= 1"], id="profile_batch_sizes"),
    ],
)
def test_bad_names_and_numbers(argv, needles, prior_run: Path, data_root: Path, capsys) -> None:
    before = snapshot(prior_run)
    extra = [] if argv[0] == "list" else ["--out", str(prior_run)]
    if argv[0] in ("train", "run"):
        extra += ["--data-root", str(data_root)]
    rc, err = run_main([*argv, *extra], capsys)
    assert_one_line_error(rc, err, *needles)
    assert snapshot(prior_run) == before


def test_unwritable_out_for_report_and_profile(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    sub = blocker / "reports"
    for argv, target in (
        (["report", str(tmp_path), "-o", str(sub)], sub),
        (["profile", "--models", "lenet5", "--device", "cpu", "--out", str(blocker)], blocker),
    ):
        rc, err = run_main(argv, capsys)
        assert_one_line_error(rc, err, str(target), "--out DIR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_missing_root_from_the_environment(tmp_path: Path, prior_run: Path, monkeypatch, capsys) -> None:
    nowhere = tmp_path / "no-data"
    monkeypatch.setenv("CAPSBENCH_DATA", str(nowhere))
    before = snapshot(prior_run)
    rc, err = run_main([*ROTATION, "--out", str(prior_run)], capsys)
    assert_one_line_error(rc, err, str(nowhere), "CAPSBENCH_DATA", "does not exist")
    assert snapshot(prior_run) == before and not nowhere.exists()


def test_data_root_is_a_file(tmp_path: Path, prior_run: Path, capsys) -> None:
    not_a_folder = tmp_path / "mnist.tar.gz"
    not_a_folder.write_bytes(b"an archive, not a folder")
    before = snapshot(prior_run)
    rc, err = run_main([*TRAIN, "--data-root", str(not_a_folder), "--out", str(prior_run)], capsys)
    assert_one_line_error(rc, err, str(not_a_folder), "is a file, not a folder", "--data-root")
    assert snapshot(prior_run) == before


def test_bad_thread_count(monkeypatch, capsys) -> None:
    monkeypatch.setenv("CAPSBENCH_THREADS", "two")
    rc, err = run_main(["list", "profiles"], capsys)
    assert_one_line_error(rc, err, "CAPSBENCH_THREADS", "'two'", "whole number >= 1")
