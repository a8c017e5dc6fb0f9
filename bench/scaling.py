"""Measure what a round costs as the simulated federation grows: 10 to 10,000 clients.

    python bench/scaling.py --dataset /abs/path/to/cifar10

runs this app on Flower's Simulation Engine (Ray, 1 CPU per client, a cold data
cache) with 10, 100, 1,000 and 10,000 simulated clients, about 10 of them sampled
each round, 3 rounds, each in a fresh process whose whole tree (Ray included) is
measured and then stopped (bench/run.py's `measure`). Writes the table into
docs/scaling.md and the measurements into bench/scaling.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path

from federations import write_between_markers  # bench/
from report import SCALE_HEADER, scale_row
from run import federation_spec, measure

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (10, 100, 1000, 10000)
ROUNDS = 3


def main() -> None:
    """Measure each size; write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a local CIFAR-10 (absolute)")
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS))
    args = parser.parse_args()
    args.dataset = str(Path(args.dataset).resolve())
    args.rounds = args.scale_rounds = ROUNDS
    if sys.platform == "linux":  # adopt orphaned Ray processes, to stop them by PID
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        args.cache_dir = Path(cache_dir)
        for clients in args.clients:
            spec = federation_spec("app", args, clients, rounds=ROUNDS, cache="cold")
            results.append(measure(spec, 7200))
    for result in results:  # the data's path is this machine's business
        result["spec"].pop("dataset", None)
        for key in ("dataset", "data-cache-dir"):
            result["spec"]["run_config"].pop(key, None)
    (ROOT / "bench" / "scaling.json").write_text(json.dumps(results, indent=2))
    rows = "\n".join(scale_row(r) for r in results)
    write_between_markers(
        ROOT / "docs" / "scaling.md",
        "<!-- table: written by bench/scaling.py -->",
        "<!-- end of table -->",
        f"{SCALE_HEADER}\n{rows}",
    )
    print(f"{SCALE_HEADER}\n{rows}")


if __name__ == "__main__":
    main()
