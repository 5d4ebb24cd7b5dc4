"""capsbench/malloc.py: freed large blocks stay mapped, so the next step does not fault them in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from capsbench.cli.main import main
from capsbench.store import environment_info

# Allocates, touches and frees a 64 MiB tensor twelve times (as training steps do), then counts
# the page faults of four more. The heap takes a few rounds to settle (aligned allocations).
_CHILD = """
import resource, torch
from capsbench.malloc import keep_freed_memory
print(keep_freed_memory()["mode"])
def touch():
    t = torch.empty(16 * 2**20)  # 64 MiB of float32
    t.fill_(1.0)
    del t
for _ in range(12):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    env = {**os.environ, "CAPSBENCH_MALLOC": mode}
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    applied, faults = proc.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_reuses_freed_pages_and_system_does_not():
    applied, faults = _faults("keep")
    assert applied == "keep"
    assert faults < 2000, faults  # 4 x 64 MiB is 65,536 pages of 4 KiB: reused, not faulted in again
    applied, faults = _faults("system")
    assert applied == "system"
    assert faults > 60000, faults  # glibc's default: a fresh mmap, every page faulted in again


def test_bad_malloc_setting_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("CAPSBENCH_MALLOC", "fast")
    assert main(["list", "models"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CAPSBENCH_MALLOC='fast'" in err and "keep" in err and "system" in err


def test_run_environment_records_the_malloc_settings():
    info = environment_info("cpu")
    assert info["malloc"]["mode"] in ("keep", "system", "unsupported", "not applied")
