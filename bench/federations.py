"""Run the app's federations for the result scripts (bench/strategies.py, privacy.py).

Each run is an ordinary run of the app, in a fresh process: its own folder,
history.json, models and TensorBoard events under the output folder given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_federation(run_config: dict[str, Any]) -> dict:
    """Simulate 10 organizations with `run_config` overrides; return the history."""
    code = (
        "from flower_tutorial.simulation import run_tutorial_simulation\n"
        f"print(run_tutorial_simulation(10, run_config={run_config!r}))"
    )
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"the run failed:\n{done.stderr[-3000:]}")
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    return _history(run_dir)


def _history(run_dir: Path) -> dict:
    """Return a run's history.json, and where its folder is ("run_dir")."""
    return json.loads((run_dir / "history.json").read_text()) | {
        "run_dir": str(run_dir)
    }


# Each configuration runs with these seeds: the spread they give is what a
# difference between two configurations has to beat.
SEEDS = (42, 43, 44)


def with_seeds(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return each run once per seed of SEEDS, named "<name>, seed <seed>"."""
    return {
        f"{name}, seed {seed}": overrides | {"seed": seed}
        for name, overrides in runs.items()
        for seed in SEEDS
    }


def by_configuration(histories: dict[str, dict]) -> dict[str, list[dict]]:
    """Group histories named by `with_seeds` into their configuration's runs."""
    grouped: dict[str, list[dict]] = {}
    for name, history in histories.items():
        grouped.setdefault(name.rsplit(", seed ", 1)[0], []).append(history)
    return grouped


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """Return "mean (min-max)" of `values`, times `scale` (percent by default)."""
    shown = [v * scale for v in values]
    mean = sum(shown) / len(shown)
    return f"{mean:.{digits}f} ({min(shown):.{digits}f}-{max(shown):.{digits}f})"


def later_mean(seconds: list[float]) -> float:
    """Return the mean of the round times after round 1 (0 if there are none)."""
    return sum(seconds[1:]) / max(1, len(seconds) - 1)


def write_between_markers(path: Path, start: str, end: str, text: str) -> None:
    """Replace what stands between the lines `start` and `end` in `path`."""
    page = path.read_text()
    before, rest = page.split(start, 1)
    _, after = rest.split(end, 1)
    path.write_text(f"{before}{start}\n{text}\n{end}{after}")


def finished_run(output_dir: Path, run_config: dict[str, Any]) -> dict | None:
    """Return the history of a finished run in `output_dir` made with `run_config`.

    Runs are reproducible: one that already ended need not run again when a
    result script is run again, say after it was stopped half-way.
    """
    for run_dir in sorted(output_dir.glob("*/")):
        if not (run_dir / "final_model.pt").is_file():
            continue
        history = _history(run_dir)
        saved = history["run_config"]
        if all(saved.get(k) == v for k, v in run_config.items() if k != "output-dir"):
            return history
    return None


def run_named(
    runs: dict[str, dict[str, Any]], base: dict[str, Any], output_dir: Path
) -> dict[str, dict]:
    """Run each named configuration (`base` | its overrides); return the histories.

    A run that already finished in its folder (`finished_run`) is not run again.
    """
    histories = {}
    for name, overrides in runs.items():
        folder = "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
        config = base | overrides | {"output-dir": str(output_dir / folder)}
        histories[name] = finished_run(output_dir / folder, config) or run_federation(
            config
        )
        accuracy = histories[name]["rounds"][-1]["centralized_accuracy"]
        print(f"{name}: {accuracy:.1%}", flush=True)
    return histories


def main(
    description: str,
    runs: dict[str, dict[str, Any]],
    base: dict[str, Any],
    write_report: Callable[[dict[str, dict]], None],
) -> None:
    """Command line of a result script: run `runs` on --dataset, write the report.

    The histories are kept in --output-dir/histories.json; with --report-only, the
    report is drawn again from them.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", help="a local CIFAR-10 folder (absolute)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    saved = args.output_dir / "histories.json"
    if args.report_only:
        histories = json.loads(saved.read_text())
    elif not args.dataset:
        parser.error("--dataset is required, unless --report-only")
    else:
        dataset = str(Path(args.dataset).resolve())
        histories = run_named(runs, base | {"dataset": dataset}, args.output_dir)
        saved.write_text(json.dumps(histories, indent=1))
    write_report(histories)
