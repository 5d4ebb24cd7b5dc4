"""Scoring one trained model on a suite's cells: tidy rows and per-image predictions."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from capsbench.store import read_predictions, save_predictions
from capsbench.suites.base import Suite, cell_generator
from capsbench.train.device import predict
from capsbench.train.jobs import TrainResult


def cell_metrics(suite: Suite, cell) -> tuple[str, ...]:
    """The metrics a successful evaluation of ``cell`` writes (see evaluate_cells)."""
    unchanged = "unchanged" in suite.metrics and cell.reference is not None
    return ("accuracy", "confidence") + (("unchanged",) if unchanged else ())


def _digest(x: torch.Tensor) -> str:
    """A fingerprint of a cell's input images (shape, dtype and bytes)."""
    h = hashlib.blake2b(f"{tuple(x.shape)}{x.dtype}".encode(), digest_size=16)
    h.update(x.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.hexdigest()


def _predictions_dir(run_dir: Path, base: dict[str, Any], result: TrainResult) -> Path:
    # keyed like the rows (the planned job), even when an out-of-memory retry trained another
    cfg = result.config
    model, seed, key = base.get("model", cfg.model), base.get("seed", cfg.seed), base.get("job_key", cfg.key)
    return run_dir / "predictions" / f"{model}-s{seed}-{key}"


def evaluate_cells(
    suite: Suite,
    result: TrainResult,
    cells: Sequence,
    x_clean: torch.Tensor,
    y: torch.Tensor,
    run_dir: Path,
    base: dict[str, Any],
    dev: torch.device,
    log: Callable[[str], None] = print,
    ctx: dict[str, Any] | None = None,
    persist: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``cells`` for one trained model; returns rows (errors become rows too).

    ``persist(rows)`` is called after each cell with that cell's rows, so an interrupted run
    keeps every finished cell.
    """
    pred_dir = _predictions_dir(run_dir, base, result)
    preds: dict[str, torch.Tensor] = {}
    scored: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}  # input digest -> (cell, scores, conf)
    rows: list[dict[str, Any]] = []
    for cell in cells:
        eval_data = f"{suite.dataset}_test" if cell.eval_data == "test" else cell.eval_data
        cell_base = {**base, "eval_data": eval_data, "transform": cell.transform, "cell": cell.name, **cell.params}
        try:
            t = time.perf_counter()
            labels = y
            if cell.source is not None:  # a cell with its own test data (affNIST)
                x, labels, eval_data = cell.source(ctx or {})
                cell_base["eval_data"] = eval_data
            else:
                x = cell.make(x_clean.to(dev), y.to(dev), cell_generator(suite.name, cell.name))
            digest = _digest(x)
            same = scored.get(digest)
            if same is None:
                scores, conf = predict(result.model, x, device=dev, amp=result.config.amp)
                scored[digest] = (cell.name, scores, conf)
            else:  # the same images as an earlier cell (rot+180 and rot-180): scored once
                _, scores, conf = same
            pred = scores.argmax(1)
            correct = pred == labels
            conf_true = conf.gather(1, labels.view(-1, 1)).squeeze(1)
            conf_pred = conf.gather(1, pred.view(-1, 1)).squeeze(1)  # for calibration (reliability, ECE)
            save_predictions(pred_dir, cell.name, {"pred": pred.to(torch.int16), "label": labels.to(torch.int16),
                                                   "conf_true": conf_true.half(), "conf_pred": conf_pred.half()})
            preds[cell.name] = pred
            n = int(labels.shape[0])
            # counts over n, not float32 means: 0.986, not 0.9860000014305115; confidence to 1e-6
            values = {"accuracy": int(correct.sum()) / n, "confidence": round(conf_true.double().mean().item(), 6)}
            if "unchanged" in cell_metrics(suite, cell):
                ref = preds.get(cell.reference)
                if ref is None:
                    saved = read_predictions(pred_dir, cell.reference)
                    if saved is None:
                        raise RuntimeError(f"the predictions of its reference cell {cell.reference} are missing")
                    ref = torch.from_numpy(saved["pred"]).long().to(pred.device)
                values["unchanged"] = int((pred == ref).sum()) / n
            cell_rows = [{**cell_base, "metric": m, "value": float(v), "n": n, "error": ""} for m, v in values.items()]
            log(f"  {base['model']} s{base['seed']} {cell.name}: accuracy {values['accuracy']:.4f} "
                f"({time.perf_counter() - t:.1f} s{', the images of ' + same[0] if same else ''})")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one broken cell must not cost the others
            msg = f"{type(e).__name__}: {e}"
            log(f"  {base['model']} s{base['seed']} {cell.name}: FAILED ({msg})")
            if os.environ.get("CAPSBENCH_DEBUG"):
                traceback.print_exc(file=sys.stderr)
            cell_rows = [{**cell_base, "metric": "error", "value": float("nan"), "n": 0, "error": msg}]
        rows.extend(cell_rows)
        if persist is not None:
            persist(cell_rows)
    return rows
