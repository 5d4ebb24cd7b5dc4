"""Claims as data and their verdicts: which cells, which two models, which direction; the checks
(clean gap, matched accuracy) that can hold a verdict back."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from capsbench.registry import Registry
from capsbench.report.load import Run
from capsbench.report.render import _pct
from capsbench.report.stats import MIN_SEEDS, NEGLIGIBLE, compare_paired
from capsbench.report.summary import _clean_accuracy

VERDICT_RULE = (
    "Verdict rule, checked in this order, on the 95% CI of the difference A - B (test-image "
    "sampling and seed-to-seed training variance both in it, the image x seed interaction counted "
    "once): 'inconclusive' if either model has fewer than 2 seeds (training variance unknown); "
    "'negligible' if the CI lies entirely within +-1 percentage point (no difference that matters, "
    "whatever its sign); 'supported' if it lies entirely on the claimed side of 0; 'refuted' if "
    "entirely on the opposite side; 'inconclusive' otherwise. Two claims compare models that may "
    "differ on clean digits too: the orientation claim is 'supported' only if CapsNet's advantage "
    "on rotated digits is also larger than its advantage on upright ones (the difference in "
    "differences has its CI above 0; otherwise 'inconclusive': the gap may be clean accuracy, not "
    "robustness), and the affNIST claim only if both models were matched in every seed: stopped by "
    "--match-accuracy with a validation accuracy at the stop within the run's tolerance above the "
    "target (otherwise 'inconclusive' instead of 'supported' or 'refuted'). A claim that two models are "
    "equally robust ('as robust as') is 'supported' if the CI lies within +-1 point, 'refuted' if it lies "
    "entirely beyond +1 or below -1, 'inconclusive' otherwise. A claim whose suite, models or "
    "predictions are missing is 'not evaluated', with the reason (the claims about further baselines "
    "are left out of a report whose runs lack their models). The report's claims are a family: each "
    "p-value is shown raw and Holm-adjusted; the verdicts use the 95% CIs, not the adjusted p."
)


# --------------------------------------------------------------------------- claims


MEASURES = ("accuracy", "unchanged")
# which cells of a run a claim pools (besides explicit cell names)
CELL_SELECTORS = {
    "transformed": "every cell but the clean one (rotations: each distinct angle once, +-180 pooled)",
    "rotations": "each distinct non-zero rotation once (+180 and -180 degrees are the same images)",
    "part_shuffle": "the k x k part-shuffle cells (not the two-tile swap)",
}


@dataclass(frozen=True)
class Claim:
    """A claim about two models, as data: on the runs of ``suites``, model ``a`` is ahead of
    model ``b`` on ``measure`` (``direction`` -1: behind), pooled over ``cells``. Every claim gets
    the same statistics and verdict rule (:data:`VERDICT_RULE`).

    ``cells``: a selector (:data:`CELL_SELECTORS`) or a tuple of cell names. ``clean_check``: an
    accuracy claim is 'supported' only if the advantage on its cells exceeds the one on the clean
    cell. ``needs_matched``: the two models must have been trained to a matched validation
    accuracy (``--match-accuracy``) in every seed, or the verdict is at most 'inconclusive'.
    ``equivalence``: the claim is that A and B are equal within +-1 point (``direction`` is then
    unused): 'supported' if the CI lies inside, 'refuted' if it lies wholly outside.
    ``optional``: a claim about further baselines, left out of a report whose runs of its suite
    lack either model (instead of a 'not evaluated' row). A model may be a suite entry trained
    with an augmentation, e.g. ``cnn_maxpool@rot180``.

    Example:
        >>> Claim("mine", "my_caps beats CapsNet on rotated digits", ("rotation",), "my_caps", "capsnet").cells
        'transformed'
    """

    name: str
    statement: str
    suites: tuple[str, ...]
    a: str
    b: str
    measure: str = "accuracy"  # "accuracy" or "unchanged" (prediction kept from the clean image)
    cells: str | tuple[str, ...] = "transformed"
    direction: int = 1
    clean_check: bool = True
    needs_matched: bool = False
    equivalence: bool = False
    optional: bool = False

    def __post_init__(self) -> None:
        from capsbench.errors import ConfigError

        if isinstance(self.suites, (str, list)):
            object.__setattr__(self, "suites", (self.suites,) if isinstance(self.suites, str) else tuple(self.suites))
        if isinstance(self.cells, list):
            object.__setattr__(self, "cells", tuple(self.cells))
        if self.measure not in MEASURES:
            raise ConfigError(f"claim {self.name!r}: measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")
        if isinstance(self.cells, str) and self.cells not in CELL_SELECTORS:
            raise ConfigError(f"claim {self.name!r}: cells must be one of {', '.join(CELL_SELECTORS)} or a list of "
                              f"cell names, got {self.cells!r}")
        if self.direction not in (1, -1):
            raise ConfigError(f"claim {self.name!r}: direction must be 1 (A ahead) or -1 (A behind), got {self.direction!r}")
        if self.a == self.b:
            raise ConfigError(f"claim {self.name!r}: compares {self.a!r} with itself")


CLAIMS: Registry = Registry("claim")


def register_claim(claim: Claim) -> Claim:
    """Add a claim to the registry: every report evaluates the registered claims."""
    CLAIMS.add(claim.name, claim)
    return claim


def list_claims() -> list[Claim]:
    """The registered claims, the paper's three first."""
    return CLAIMS.values()


register_claim(Claim(
    "orientation", "CapsNet is more accurate than the pooling CNN on rotated digits "
    "(pooled over the non-zero angles of the rotation suite)", ("rotation",), "capsnet", "cnn_maxpool",
    "accuracy", cells="rotations"))
register_claim(Claim(
    "pooling", "the pooling CNN keeps its prediction on shuffled parts more often than CapsNet "
    "(fraction of predictions unchanged from the clean image, pooled over the k x k shuffle cells; the "
    "two-tile swap cell is not pooled)", ("part_shuffle",), "cnn_maxpool", "capsnet", "unchanged",
    cells="part_shuffle"))
register_claim(Claim(
    "affNIST", "CapsNet generalises better to affNIST than the CNN (accuracy on the affnist cell)",
    ("affnist",), "capsnet", "cnn_maxpool", "accuracy", cells=("affnist",), clean_check=False,
    needs_matched=True))


# Claims about further baselines (optional: reported when a run of the rotation suite has both models,
# e.g. `capsbench run --suite rotation --models capsnet,cnn_maxpool,steerable_c8,cnn_maxpool@rot180,
# efficient_capsnet,em_capsnet --seeds 3`).
register_claim(Claim(
    "equivariant CNN", "CapsNet is more accurate on rotated digits than a CNN built to be rotation-equivariant, "
    "the C8 steerable CNN (both trained upright; pooled over the non-zero angles)", ("rotation",), "capsnet",
    "steerable_c8", "accuracy", cells="rotations", optional=True))
register_claim(Claim(
    "augmentation", "the pooling CNN trained on digits rotated by up to 180 degrees is more accurate on rotated "
    "digits than CapsNet trained upright (training on rotations closes the CNN's gap)", ("rotation",),
    "cnn_maxpool@rot180", "capsnet", "accuracy", cells="rotations", clean_check=False, optional=True))
register_claim(Claim(
    "Efficient-CapsNet", "Efficient-CapsNet (self-attention routing) is as robust to rotation as the 2017 "
    "CapsNet: accuracy on rotated digits within 1 point", ("rotation",), "efficient_capsnet", "capsnet",
    "accuracy", cells="rotations", clean_check=False, equivalence=True, optional=True))
register_claim(Claim(
    "EM capsules", "matrix capsules with EM routing are as robust to rotation as the 2017 CapsNet: accuracy on "
    "rotated digits within 1 point", ("rotation",), "em_capsnet", "capsnet", "accuracy", cells="rotations",
    clean_check=False, equivalence=True, optional=True))


def load_claims(path: str | os.PathLike) -> list[Claim]:
    """Claims from a JSON or TOML file: a list of tables with :class:`Claim`'s fields (JSON: a
    list, or ``{"claims": [...]}``; TOML: ``[[claims]]`` tables).

    Example (TOML)::

        [[claims]]
        name = "my_caps beats capsnet on rotations"
        statement = "my_caps is more accurate than CapsNet on rotated digits"
        suites = ["rotation"]
        a = "my_caps"
        b = "capsnet"
    """
    import json
    from pathlib import Path

    from capsbench.errors import ConfigError

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"claim file {p}: cannot be read ({e.strerror or e})") from None
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise ConfigError(f"claim file {p}: reading TOML on Python 3.10 needs tomli (pip install tomli); "
                          "or write the claims as JSON") from None
    except ValueError as e:
        raise ConfigError(f"claim file {p}: not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'} ({e})") from None
    items = data.get("claims") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError(f"claim file {p}: holds no claims (a list of tables, or 'claims = [...]')")
    fields = set(Claim.__dataclass_fields__)
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ConfigError(f"claim file {p}: claim {i} is a {type(item).__name__}, not a table of fields")
        unknown = sorted(set(item) - fields)
        missing = sorted(f for f in ("name", "statement", "suites", "a", "b") if f not in item)
        if unknown or missing:
            raise ConfigError(f"claim file {p}: claim {i} "
                              + (f"has unknown field(s) {', '.join(unknown)}" if unknown else "")
                              + ("; " if unknown and missing else "")
                              + (f"lacks {', '.join(missing)}" if missing else "")
                              + f" (fields: {', '.join(Claim.__dataclass_fields__)})")
        out.append(Claim(**item))
    return out


def compare_claim(a: str, b: str, suite: str, measure: str = "accuracy") -> Claim:
    """The claim ``capsbench report --compare A:B`` poses: A ahead of B on the suite's transformed cells."""
    what = "more accurate than" if measure == "accuracy" else "keeps its prediction more often than"
    return Claim(f"{a} vs {b} ({suite})", f"{a} is {what} {b} on the {suite} suite's transformed cells "
                 "(each distinct transform once)", (suite,), a, b, measure)


@dataclass
class Verdict:
    claim: str
    statement: str
    run: str = ""
    comparison: str = ""
    measure: str = ""
    difference: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    se_images: float = float("nan")
    se_seeds: float = float("nan")
    p_value: float = float("nan")
    p_holm: float = float("nan")  # Holm-adjusted over the claims of one report
    # A - B on the run's clean cell (same seeds, same images), beside the claim's difference
    clean_difference: float = float("nan")
    clean_ci_low: float = float("nan")
    clean_ci_high: float = float("nan")
    pairs: int = 0
    n_seeds: int = 0
    verdict: str = "not evaluated"
    notes: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return {
            "claim": self.claim, "run": self.run, "comparison": self.comparison, "measure": self.measure,
            "difference": self.difference, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "se_images": self.se_images, "se_seeds": self.se_seeds, "p_value": self.p_value,
            "p_holm": self.p_holm, "clean_difference": self.clean_difference, "clean_ci_low": self.clean_ci_low,
            "clean_ci_high": self.clean_ci_high,
            "pairs": self.pairs, "seeds": self.n_seeds, "verdict": self.verdict, "notes": " ".join(self.notes),
        }


def select_cells(which: str | Sequence[str], run: Run) -> list[str]:
    """The cells of ``run`` that ``which`` names: a list of cell names, or a key of ``CELL_SELECTORS``."""
    cells = run.suite_meta.get("cells", []) or []
    if not isinstance(which, str):
        return [c["name"] for c in cells if c.get("name") in which]
    rotations = any(c.get("transform") == "rotation" for c in cells)
    if which == "rotations" or (which == "transformed" and rotations):
        # one cell per distinct rotation: +180 and -180 degrees are the same image, pooled once
        seen, out = set(), []
        for c in cells:
            params = c.get("params") or {}
            if c.get("transform") != "rotation" or not params.get("angle"):
                continue
            signed = (params["angle"] * (-1 if params.get("direction") == "cw" else 1)) % 360
            if signed not in seen:
                seen.add(signed)
                out.append(c["name"])
        return out
    if which == "part_shuffle":
        return [c["name"] for c in cells if c.get("transform") == "part_shuffle"]
    return [c["name"] for c in cells if c.get("name") != run.clean_cell]  # "transformed"


def evaluate_claim(claim: Claim, runs: Sequence[Run]) -> list[Verdict]:
    """One verdict per run of the claim's suite (one 'not evaluated' verdict when there is none)."""
    matching = [r for r in runs if r.suite in claim.suites]
    if claim.optional:
        matching = [r for r in matching if claim.a in r.models() and claim.b in r.models()]
        if not matching:
            return []
    if not matching:
        return [Verdict(claim.name, claim.statement, measure=claim.measure,
                        comparison=f"{claim.a} vs {claim.b}",
                        notes=[f"no run of the {' / '.join(claim.suites)} suite was given to the report."])]
    return [_evaluate_claim_on(claim, run) for run in matching]


def _evaluate_claim_on(claim: Claim, run: Run) -> Verdict:
    v = Verdict(claim.name, claim.statement, run=run.label, measure=claim.measure,
                comparison=f"{claim.a} - {claim.b}")
    present = run.models()
    absent = [m for m in (claim.a, claim.b) if m not in present]
    if absent:
        what = f"model {absent[0]} has" if len(absent) == 1 else f"models {' and '.join(absent)} have"
        v.notes.append(f"{what} no results in {run.label} (models with results: {', '.join(present) or 'none'}).")
        return v
    cells = select_cells(claim.cells, run)
    if not cells:
        v.notes.append(f"{run.label} has no cells this claim uses.")
        return v
    seeds = sorted(set(run.seeds(claim.a)) & set(run.seeds(claim.b)))
    extra = sorted(set(run.seeds(claim.a)) ^ set(run.seeds(claim.b)))
    if extra:
        v.notes.append(f"seeds {', '.join(map(str, extra))} are present for only one of the two models and are "
                       "left out of the pairing.")
    a_units, b_units, unit_seeds, missing = [], [], [], []
    clean_units: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # seed -> (A, B) correct on the clean cell
    for seed in seeds:
        ref_a = ref_b = None
        if run.clean_cell is not None:
            ref_a = run.predictions(claim.a, seed, run.clean_cell)
            ref_b = run.predictions(claim.b, seed, run.clean_cell)
            if ref_a is not None and ref_b is not None and np.array_equal(ref_a["label"], ref_b["label"]):
                clean_units[seed] = (ref_a["pred"] == ref_a["label"], ref_b["pred"] == ref_b["label"])
        if claim.measure == "unchanged" and (ref_a is None or ref_b is None):
            missing.append(f"{run.clean_cell} (seed {seed})")
            continue
        for cell in cells:
            pa, pb = run.predictions(claim.a, seed, cell), run.predictions(claim.b, seed, cell)
            if pa is None or pb is None:
                missing.append(f"{cell} (seed {seed})")
                continue
            if len(pa["pred"]) != len(pb["pred"]) or not np.array_equal(pa["label"], pb["label"]):
                missing.append(f"{cell} (seed {seed}: the two models were scored on different images)")
                continue
            if claim.measure == "unchanged":
                a_units.append(pa["pred"] == ref_a["pred"])
                b_units.append(pb["pred"] == ref_b["pred"])
            else:
                a_units.append(pa["pred"] == pa["label"])
                b_units.append(pb["pred"] == pb["label"])
            unit_seeds.append(seed)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        v.notes.append(f"no usable per-image predictions for: {shown}.")
    if not a_units:
        v.notes.insert(0, "no paired predictions to compare.")
        return v
    try:
        res = compare_paired(a_units, b_units, unit_seeds, direction=claim.direction)
    except ValueError as e:  # seeds scored on different numbers of images: no images x seeds table
        v.notes.insert(0, f"the predictions cannot be paired across seeds: {e}.")
        return v
    v.difference, v.ci_low, v.ci_high = res["difference"], res["ci_low"], res["ci_high"]
    v.se_images, v.se_seeds, v.p_value = res["se_images"], res["se_seeds"], res["p_value"]
    v.pairs, v.n_seeds, v.verdict = res["pairs"], res["n_seeds"], res["verdict"]
    if claim.equivalence:
        v.comparison = f"{claim.a} - {claim.b} (equal within +-{_pp(NEGLIGIBLE)} pp)"
        v.verdict = equivalence_verdict(v.ci_low, v.ci_high, v.n_seeds)
    n_images = len(a_units[0]) if len({len(u) for u in a_units}) == 1 else None
    v.notes.insert(0, f"{v.n_seeds} seed(s) of each model x {len(a_units) // max(v.n_seeds, 1)} cell(s)"
                      + (f" x {n_images} test images" if n_images else f", {v.pairs} paired outcomes") + ". "
                      f"Standard error {_pp(v.se_images)} pp from test-image sampling"
                      + (f", {_pp(v.se_seeds)} pp from training (seed to seed)." if v.n_seeds >= MIN_SEEDS
                         else "; training variance unknown with one seed: run --seeds 3 or more for a verdict."))
    clean_seeds = [k for k in seeds if k in clean_units]
    clean = None
    if clean_seeds:
        clean = compare_paired([clean_units[k][0] for k in clean_seeds], [clean_units[k][1] for k in clean_seeds],
                               clean_seeds)
        v.clean_difference, v.clean_ci_low, v.clean_ci_high = clean["difference"], clean["ci_low"], clean["ci_high"]
    if claim.measure == "accuracy" and claim.clean_check:
        _clean_check(v, claim, run, a_units, b_units, unit_seeds, clean_units, clean)
    elif clean is not None and claim.clean_check:
        v.notes.append(f"On the clean cell ({run.clean_cell}) {claim.a} - {claim.b} = {_pp(clean['difference'], True)} "
                       f"pp [{_pp(clean['ci_low'], True)}, {_pp(clean['ci_high'], True)}].")
    if claim.needs_matched:
        notes, matched = _affnist_notes(run, claim)
        v.notes.extend(notes)
        if not matched and v.verdict in ("supported", "refuted"):
            v.notes.append(f"Verdict 'inconclusive' instead of '{v.verdict}': the models were not compared "
                           "at a matched clean accuracy.")
            v.verdict = "inconclusive"
    return v


def equivalence_verdict(ci_low: float, ci_high: float, n_seeds: int, margin: float = NEGLIGIBLE) -> str:
    """The verdict on 'A is as good as B': the CI inside +-margin 'supported', wholly beyond it
    'refuted', else 'inconclusive' (and 'inconclusive' with fewer than 2 seeds, as every claim)."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "not evaluated"
    if n_seeds < MIN_SEEDS:
        return "inconclusive"
    if -margin <= ci_low and ci_high <= margin:
        return "supported"
    if ci_low > margin or ci_high < -margin:
        return "refuted"
    return "inconclusive"


def _pp(x: float, sign: bool = False) -> str:
    """A proportion as percentage points with two decimals ("nan" stays "nan")."""
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _clean_check(v: Verdict, claim: Claim, run: Run, a_units, b_units, unit_seeds, clean_units, clean) -> None:
    """An accuracy claim on transformed cells against the clean cell: note the clean difference
    and the difference in differences (the advantage on transformed digits beyond the one on
    clean digits), and withhold 'supported' unless the latter's CI is above 0."""
    if not all(s in clean_units for s in unit_seeds):
        v.notes.append(f"The clean cell ({run.clean_cell}) has no usable predictions: the difference could not be "
                       "set against the clean-accuracy difference.")
        if v.verdict == "supported":
            v.notes.append("Verdict 'inconclusive' instead of 'supported': the clean-accuracy check could not be made.")
            v.verdict = "inconclusive"
        return
    did = compare_paired([u.astype(float) - clean_units[k][0] for u, k in zip(a_units, unit_seeds, strict=True)],
                         [u.astype(float) - clean_units[k][1] for u, k in zip(b_units, unit_seeds, strict=True)],
                         unit_seeds)
    v.notes.append(f"On the clean cell ({run.clean_cell}) {claim.a} - {claim.b} = {_pp(clean['difference'], True)} pp "
                   f"[{_pp(clean['ci_low'], True)}, {_pp(clean['ci_high'], True)}]; the advantage beyond it "
                   f"(difference in differences: each model's accuracy on the claim's cells minus its clean accuracy) "
                   f"is {_pp(did['difference'], True)} pp [{_pp(did['ci_low'], True)}, {_pp(did['ci_high'], True)}].")
    beyond = did["ci_low"] > 0 if claim.direction > 0 else did["ci_high"] < 0
    if v.verdict == "supported" and not beyond:
        v.notes.append(f"Verdict 'inconclusive' instead of 'supported': {claim.a}'s advantage on the claim's cells is not "
                       "shown to exceed its advantage on clean digits, so it may be clean accuracy, not robustness.")
        v.verdict = "inconclusive"


def _match_records(run: Run, model: str) -> dict[int, tuple[int | None, float | None]]:
    """seed -> (step at which --match-accuracy stopped the job or None, validation accuracy at
    the stop or at the last check, None if not recorded), from the run's rows and job records."""
    rec: dict[int, tuple[int | None, float | None]] = {}
    for j in run.meta.get("jobs", []) or []:
        if j.get("model") == model and "stopped_early_at" in j:
            rec[int(j.get("seed", -1))] = (j.get("stopped_early_at") or None, j.get("match_val_accuracy"))
    df = run.rows
    for metric, pos in (("matched_at_step", 0), ("match_val_accuracy", 1)):
        for _, r in df[(df["model"] == model) & (df["metric"] == metric)].iterrows():
            old = list(rec.get(int(r["seed"]), (None, None)))
            if old[pos] is None and not pd.isna(r["value"]):
                old[pos] = int(r["value"]) if pos == 0 else float(r["value"])
            rec[int(r["seed"])] = (old[0], old[1])
    return rec


def _affnist_notes(run: Run, claim: Claim) -> tuple[list[str], bool]:
    """Notes on the affNIST comparison and whether both models were matched: in every seed,
    stopped by --match-accuracy with a validation accuracy at the stop in [target, target + tolerance]."""
    from capsbench.train.matching import MATCH_TOLERANCE
    from capsbench.train.matching import matched as is_matched

    notes = []
    target = run.meta.get("match_accuracy")
    tol = run.meta.get("match_tolerance") or MATCH_TOLERANCE
    matched = target is not None
    if target is None:
        notes.append("Trained without --match-accuracy: the models are not at a matched clean accuracy "
                     "(the paper compares them at 99.23% vs 99.22% on expanded MNIST).")
    else:
        for model in (claim.a, claim.b):
            rec = _match_records(run, model)
            if not rec:
                matched = False
                notes.append(f"{model}: no record of its accuracy at the --match-accuracy stop.")
                continue
            shown = "; ".join(f"seed {s}: " + (f"stopped at step {step}" if step else "not stopped (full budget)")
                              + (f", {_pct(acc)}%" if acc is not None else ", accuracy not recorded")
                              for s, (step, acc) in sorted(rec.items()))
            bad = [s for s, (step, acc) in rec.items() if not is_matched(target, acc, step, tol)]
            if bad:
                matched = False
            notes.append(f"{model} validation accuracy at the stop ({shown})"
                         + (f": NOT matched in seed(s) {', '.join(map(str, sorted(bad)))}." if bad else "."))
        notes.append(f"Matched means: stopped by --match-accuracy {_pct(target)}% with a validation accuracy at the "
                     f"stop within {_pp(tol)} pp above it, in every seed of both models; "
                     + ("they were." if matched else "they were not."))
    clean = _clean_accuracy(run)
    if claim.a in clean and claim.b in clean:
        notes.append(f"Expanded-MNIST test accuracy: {claim.a} {_pct(clean[claim.a])}%, {claim.b} {_pct(clean[claim.b])}%.")
    ed = set(run.rows[run.rows["cell"] == "affnist"]["eval_data"].dropna().astype(str))
    if "affnist_synth" in ed:
        notes.append("Evaluated on the generated affNIST-style set (affnist_synth), not the real affNIST; "
                     "numbers are not directly comparable with the paper's.")
    return notes, matched


def difference_by_cell(run: Run, a: str, b: str, cells: Sequence[str] | None = None) -> pd.DataFrame:
    """A - B accuracy (fractions) on each cell of ``run``, paired on the same test images, with
    its 95% interval over images and seeds (:func:`compare_paired`); one row per cell with both
    models' predictions in every shared seed (columns: cell, difference, ci_low, ci_high, n_seeds)."""
    seeds = sorted(set(run.seeds(a)) & set(run.seeds(b)))
    rows = []
    for cell in cells if cells is not None else run.cell_names:
        a_units, b_units, unit_seeds = [], [], []
        for seed in seeds:
            pa, pb = run.predictions(a, seed, cell), run.predictions(b, seed, cell)
            if pa is None or pb is None or not np.array_equal(pa["label"], pb["label"]):
                break
            a_units.append(pa["pred"] == pa["label"])
            b_units.append(pb["pred"] == pb["label"])
            unit_seeds.append(seed)
        else:
            if a_units:
                res = compare_paired(a_units, b_units, unit_seeds)
                rows.append({"cell": cell, "difference": res["difference"], "ci_low": res["ci_low"],
                             "ci_high": res["ci_high"], "n_seeds": res["n_seeds"]})
    return pd.DataFrame(rows, columns=["cell", "difference", "ci_low", "ci_high", "n_seeds"])
