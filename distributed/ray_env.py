"""Connecting to Ray: an existing cluster (RAY_ADDRESS / ray job submit) or a
local instance started on demand (the embedded default)."""
from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS if set, else start a local Ray."""
    import ray

    if not ray.is_initialized():
        kwargs = dict(ignore_reinit_error=True, logging_level=logging.WARNING,
                      log_to_driver=bool(int(os.environ.get("DIFFREC_WORKER_LOGS", "1"))))
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data logs every operator at INFO when stdout is not a terminal; keep
    the progress bars on a terminal and the warnings elsewhere."""
    import sys

    from ray.data import DataContext

    ctx = DataContext.get_current()
    if not sys.stdout.isatty():
        ctx.enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
