"""Benchmark: prepare the large synthetic set (default 500k users x 1M items x
50M interactions) and print wall time and peak memory.

    python bench/prepare.py [--users N --items N --interactions N] [--workdir DIR] [--json PATH]

Target on a 2-core, 24 GiB machine: under 10 minutes and under 12 GiB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import PeakMemory  # noqa: E402
from distributed.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from distributed.ray_env import ensure_ray  # noqa: E402
from distributed.sources import SourceSpec  # noqa: E402
from distributed.synthetic import SyntheticSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=500_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--interactions", type=int, default=50_000_000)
    p.add_argument("--workdir", default=None, help="where the prepared set goes (kept); default a temp dir")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    output = workdir / f"synthetic-{args.items}"
    ensure_ray()   # started before measuring: Ray's own start-up is not preparation
    spec = SourceSpec(kind="synthetic", synthetic=SyntheticSpec(
        n_users=args.users, n_items=args.items, n_interactions=args.interactions))
    with PeakMemory() as mem:
        t0 = time.time()
        summary = prepare_dataset(spec, output, PrepareOptions(overwrite=True))
        wall = time.time() - t0
    counts = summary["counts"]
    result = {
        "wall_s": round(wall, 1), "peak_mem_gib": round(mem.peak_used_gib, 2),
        "driver_peak_rss_gib": round(mem.peak_rss_gib, 2),
        "n_users": counts["n_users"], "n_items": counts["n_items"],
        "n_interactions": counts["n_train"] + counts["n_valid"] + counts["n_test"],
        "timings": {k: round(v, 1) for k, v in summary["timings"].items()}, "output": str(output),
    }
    print(f"\nprepared {result['n_interactions']:,} interactions ({result['n_users']:,} users, "
          f"{result['n_items']:,} items)")
    print(f"wall time        {wall:8.1f} s   (target < 600 s)")
    print(f"peak memory      {mem.peak_used_gib:8.2f} GiB (machine-wide, Ray workers + object store; target < 12)")
    print(f"driver peak RSS  {mem.peak_rss_gib:8.2f} GiB")
    print(f"stages           {result['timings']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
