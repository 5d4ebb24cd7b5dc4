"""Training to a matched accuracy (``--match-accuracy``): when a job is at the target, and how
often validation is checked on the way (docs/methods.md, "Matched accuracy")."""

from __future__ import annotations

import math

from capsbench.data.splits import (
    VALIDATION_SIZE,
)
from capsbench.errors import ConfigError

# --------------------------------------------------------------------------- matched accuracy

# A model is "at the matched accuracy" when its validation accuracy at the stop lies in
# [target, target + tolerance] (the profile's match_tolerance; MATCH_TOLERANCE by default).
# Within NEAR_TARGET below the target, validation is checked NEAR_EVERY times as often, so that a stop
# does not overshoot by more than a few updates' gain. Far from the target a check first scores
# a class-stratified MATCH_FAR_SUBSET of the validation digits and scores all of them only once
# that subset is within NEAR_TARGET: a stop is always decided on the whole split. A check that
# lands above target + tolerance does not stop the job: training goes back to the state of the
# previous check (the model, optimiser and schedule are kept in memory at every check) and replays
# the same batches with a check after every step, so the stop is the first step at or above the
# target. Where a single step jumps past the band (CapsNet on 40x40 canvases in the quick profile
# moves by over a point per step), the search goes on, checking after every step, for up to
# MATCH_SEARCH_STEPS more steps: the stop is the first step whose accuracy lies in the band, or
# the job is left unmatched (and so is any claim that needs it).
MATCH_TOLERANCE = 0.001  # 0.1 percentage point
MATCH_SEARCH_STEPS = 20
NEAR_TARGET = 0.01
NEAR_EVERY = 10
MATCH_FAR_SUBSET = 1000
# The validation split must resolve the tolerance: at least this many accuracy steps (1 / n) in it.
MATCH_STEPS_IN_TOLERANCE = 5


def check_match_target(target: float, n_val: int = VALIDATION_SIZE, tolerance: float = MATCH_TOLERANCE) -> None:
    """Refuse a ``--match-accuracy`` outside (0, 1), or one the validation split cannot resolve."""
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        hint = f" (for {target:g}% pass {target / 100:g})" if isinstance(target, (int, float)) and 1 < target < 100 else ""
        raise ConfigError(f"--match-accuracy is a fraction of the validation digits, in (0, 1); got {target!r}{hint}")
    if 1 / n_val > tolerance / MATCH_STEPS_IN_TOLERANCE:
        raise ConfigError(
            f"--match-accuracy {target:g}: the validation split ({n_val} images, accuracy steps of "
            f"{100 / n_val:.3g} points) is too small to resolve the matching tolerance of {100 * tolerance:g} "
            f"point(s); it needs at least {math.ceil(MATCH_STEPS_IN_TOLERANCE / tolerance)} images")


def matched(target: float | None, val_accuracy: float | None, stopped_at: int | None,
            tolerance: float = MATCH_TOLERANCE) -> bool:
    """Whether a job stopped at the matched accuracy: it reached the target and did not overshoot."""
    if target is None or val_accuracy is None or not stopped_at:
        return False
    return target <= val_accuracy <= target + tolerance + 1e-12  # float noise in target + tolerance
