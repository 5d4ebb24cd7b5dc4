"""Running a suite: planning its jobs (``run``), where they run (``executors``), scoring cells
(``cells``), and the Python API (``api``: evaluate, load_results, verdicts)."""
