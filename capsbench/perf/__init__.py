"""What routing costs: FLOPs, step times, stage breakdowns (``capsbench profile``) and the
speed benchmark of training variants (``capsbench speed``)."""
