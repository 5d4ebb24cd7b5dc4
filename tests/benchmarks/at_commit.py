"""A capsbench source file as it was at another commit, loaded as a module of its own beside the
current package (for the A/B timings of fft_conv_ab.py and em_against.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def module_at(commit: str, path: str, edit=lambda source: source) -> ModuleType:
    """``path`` (relative to the repository root) at ``commit``, after ``edit(source)``.

    Exits with one line naming the commit and the file when git cannot show it."""
    run = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{Path(sys.argv[0]).name}: cannot read {path} at {commit!r}: {run.stderr.strip()}")
    name = f"{Path(path).stem}_at_{commit}".replace("~", "_").replace("^", "_").replace("-", "_")
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(edit(run.stdout))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up
    spec.loader.exec_module(module)
    return module
