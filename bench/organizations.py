"""Whom the model serves worst: every organization's results, IID and Dirichlet 0.3.

    python bench/organizations.py --dataset /abs/path/to/cifar10 \
        --output-dir outputs/organizations

runs the tutorial's federation (10 organizations, 5 rounds, 1 CPU per client) with
every organization evaluating every round (`fraction-evaluate = 1.0`), on the IID
split and on Dirichlet(0.3), three seeds each; then trains each organization alone
for the tutorial's 5 epochs (`local_baseline --compare`). Each run is an ordinary
run of the app. The tables go to docs/results.md, and the pictures of seed 42's
runs (organizations.png, gain.png) and of all seeds (docs/seeds.png) to docs/.
Takes about half an hour on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import federations  # bench/
from federations import (
    SEEDS,
    by_configuration,
    spread,
    with_seeds,
    write_between_markers,
)

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5
EPOCHS = 5  # the tutorial's step 1
SETTINGS: dict[str, dict[str, Any]] = {
    "IID": {"partitioner": "iid"},
    "Dirichlet 0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
}
PICTURES = {"IID": "iid", "Dirichlet 0.3": "dirichlet-0.3"}  # docs/<folder>/
BASE = {"num-server-rounds": ROUNDS, "fraction-evaluate": 1.0}
BASE |= {"min-evaluate-clients": 10}


def _baselines(histories: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each run's local_baselines.json, made (`--compare`) where it is missing."""
    from flower_tutorial.local_baseline import compare

    baselines = {}
    for name, history in histories.items():
        run_dir = Path(history["run_dir"])
        saved = run_dir / "local_baselines.json"
        if not saved.is_file():
            compare(run_dir, EPOCHS, sys.exit)
        baselines[name] = json.loads(saved.read_text())
    return baselines


def _round_rows(seeds: list[dict[str, Any]]) -> list[str]:
    """One row per round: centralized, federated, worst, median and best, spread."""
    rows = []
    for server_round in range(1, ROUNDS + 1):
        entries = [h["rounds"][server_round] for h in seeds]
        per_organization = [list(e["evaluate_accuracy"].values()) for e in entries]
        cells = [
            spread([e["centralized_accuracy"] for e in entries]),
            spread([e["distributed_accuracy"] for e in entries]),
            spread([min(a) for a in per_organization]),
            spread([statistics.median(a) for a in per_organization]),
            spread([max(a) for a in per_organization]),
        ]
        rows.append(f"| {server_round} | " + " | ".join(cells) + " |")
    return rows


def _gain_rows(baselines: list[dict[str, Any]]) -> list[str]:
    """One row per seed: what the organizations gain by joining, worst to best."""
    rows = []
    for seed, baseline in zip(SEEDS, baselines, strict=True):
        organizations = baseline["organizations"].values()
        gains = [o["gain"] for o in organizations]
        alone = [o["local_accuracy"] for o in organizations]
        alone_test = [o["local_test_accuracy"] for o in organizations]
        lose = sum(g < 0 for g in gains)
        rows.append(
            f"| {seed} | {100 * statistics.mean(alone):.1f} "
            f"| {100 * min(gains):+.1f} | {100 * statistics.mean(gains):+.1f} "
            f"| {100 * max(gains):+.1f} | {lose} of {len(gains)} "
            f"| {100 * statistics.mean(alone_test):.1f} "
            f"| {100 * baseline['global_test_accuracy']:.1f} |"
        )
    return rows


ROUND_HEADER = (
    "| round | centralized acc % | federated acc % | worst organization % "
    "| median organization % | best organization % |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: |"
)
GAIN_HEADER = (
    f"| seed | alone ({EPOCHS} epochs): own data % | gain by joining: worst "
    "| mean | best (points) | organizations that lose | alone: test split % "
    "| federated: test split % |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def write_report(histories: dict[str, dict[str, Any]]) -> None:
    """Write docs/results.md's tables and the pictures."""
    runs = by_configuration(histories)
    baselines = _baselines(histories)
    text = [
        f"Mean of the seeds {', '.join(map(str, SEEDS))} and, in brackets, the "
        "lowest and highest; accuracy on each organization's validation data "
        "for the organizations, on the 10,000 test images for centralized."
    ]
    for setting, seeds in runs.items():
        names = [f"{setting}, seed {seed}" for seed in SEEDS]
        folder = ROOT / "docs" / PICTURES[setting]
        folder.mkdir(exist_ok=True)
        first = Path(histories[names[0]]["run_dir"])
        for picture in ("organizations.png", "gain.png"):
            shutil.copy(first / picture, folder / picture)
        text += [
            f"### {setting}",
            "\n".join([ROUND_HEADER, *_round_rows(seeds)]),
            "\n".join([GAIN_HEADER, *_gain_rows([baselines[n] for n in names])]),
            f"![every organization, round by round, {setting}, seed 42]"
            f"({PICTURES[setting]}/organizations.png)\n"
            f"![what each organization gains, {setting}, seed 42]"
            f"({PICTURES[setting]}/gain.png)",
        ]
    write_between_markers(
        ROOT / "docs" / "results.md",
        "<!-- organizations: written by bench/organizations.py -->",
        "<!-- end of organizations -->",
        "\n\n".join(text),
    )
    _plot_seeds(runs)


def _plot_seeds(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Centralized and worst organization's accuracy per round, each seed a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for setting, seeds in runs.items():
        xs = list(range(1, ROUNDS + 1))
        for label, value, style in (
            ("centralized", lambda e: e["centralized_accuracy"], "-"),
            ("worst organization", lambda e: min(e["evaluate_accuracy"].values()), ":"),
        ):
            curves = [[value(h["rounds"][r]) for r in xs] for h in seeds]
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(xs))]
            (line,) = ax.plot(xs, mean, style, marker="o", label=f"{setting}, {label}")
            low = [min(c[i] for c in curves) for i in range(len(xs))]
            high = [max(c[i] for c in curves) for i in range(len(xs))]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.set(
        xlabel="round",
        ylabel="accuracy",
        title=f"10 organizations, mean of {len(SEEDS)} seeds (band: lowest to highest)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "seeds.png")
    plt.close(fig)


if __name__ == "__main__":
    federations.main(__doc__.splitlines()[0], with_seeds(SETTINGS), BASE, write_report)
