"""Train DiffRec / L-DiffRec / T-DiffRec / LT-DiffRec with Ray Train.

    python jobs/train_ldiffrec.py                       # synthetic demo data, local Ray
    python jobs/train_ldiffrec.py --data data/ml-1m --config jobs/configs/ml-1m.yaml --model ldiffrec
    ray job submit --working-dir . -- python jobs/train_ldiffrec.py --data /shared/data/shop --workers 8 \
        --gpus-per-worker 4 --storage s3://bucket/runs --name shop-ldiffrec model.n_clusters=16

Overrides are key=value (``model.steps=40``, ``lr=5e-4``, ``n_clusters=4``). Re-running with the same
--name and --storage resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distributed.config import load_preset  # noqa: E402
from distributed.dataset_format import DatasetError  # noqa: E402
from distributed.trainer import Resources, train  # noqa: E402
from models.config import VARIANTS  # noqa: E402

DEMO_DATA = REPO / "runs" / "demo-data"
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def ensure_demo_data() -> str:
    """The embedded default dataset: small synthetic data, prepared once."""
    if not (DEMO_DATA / "meta.json").exists():
        from distributed.prepare import PrepareOptions, prepare_dataset
        from distributed.sources import SourceSpec
        from distributed.synthetic import SyntheticSpec
        prepare_dataset(SourceSpec("synthetic", synthetic=SyntheticSpec(n_users=2000, n_items=1000,
                                                                        n_interactions=60000, seed=0)),
                        DEMO_DATA, PrepareOptions(overwrite=True))
    return str(DEMO_DATA)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="prepared dataset directory (default: synthetic demo data)")
    p.add_argument("--model", choices=VARIANTS, default=None, help="variant (default: the preset's, else ldiffrec)")
    p.add_argument("--config", default=None, help="YAML preset (default: jobs/configs/demo.yaml for the demo)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--threads-per-worker", type=int, default=None)
    p.add_argument("--max-failures", type=int, default=2, help="worker restarts from the last checkpoint")
    p.add_argument("--storage", default=os.environ.get("DIFFREC_STORAGE", "runs"),
                   help="storage path (local dir or URI) for runs/checkpoints (default: $DIFFREC_STORAGE, else runs)")
    p.add_argument("--name", default=None, help="run name (same name + storage = resume)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and data, print it and the memory estimate, train nothing")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="GPU memory per device for the estimate's fit check when it cannot be detected here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data or ensure_demo_data()
    preset = args.config or (str(DEMO_CONFIG) if args.data is None else None)
    try:
        config = load_preset(preset, args.model or ("ldiffrec" if preset is None else None))
        config = config.with_overrides(args.overrides)
        resources = Resources(args.workers, args.cpus_per_worker, args.gpus_per_worker,
                              args.threads_per_worker, args.max_failures)
        # --- start-up estimate (distributed/estimate.py) ---
        # --device-memory-gib reaches the estimate through the environment for this call
        # only (restored after, so an in-process caller's environment is left as it was).
        previous = os.environ.get("DIFFREC_DEVICE_MEMORY_GIB")
        if args.device_memory_gib:
            os.environ["DIFFREC_DEVICE_MEMORY_GIB"] = str(args.device_memory_gib)
        try:
            if args.dry_run:
                from distributed.estimate import startup_estimate
                from distributed.trainer import validate_run
                meta = validate_run(data, config, resources)
                print(json.dumps(config.to_dict(), indent=2))
                startup_estimate(config, meta, None, resources)   # refuses (exit 2) what cannot fit
                return 0
            train(data, config, resources, storage=args.storage, name=args.name)
        finally:
            if previous is None:
                os.environ.pop("DIFFREC_DEVICE_MEMORY_GIB", None)
            else:
                os.environ["DIFFREC_DEVICE_MEMORY_GIB"] = previous
    except (ValueError, FileNotFoundError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
