"""Suites: what a model trains on and which test cells score it. ``base`` holds Cell, Suite,
the registry and the MNIST suites; importing the package registers every suite."""

from capsbench.suites.base import SUITES, Cell, Suite, get_suite, list_suites

from capsbench.suites import affnist  # noqa: E402, F401  isort: skip  (registers the affnist suite)

__all__ = ["SUITES", "Cell", "Suite", "get_suite", "list_suites"]
