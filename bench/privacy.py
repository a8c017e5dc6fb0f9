"""Measure what privacy costs: SecAgg+ and differential privacy on the full CIFAR-10.

    python bench/privacy.py --dataset /abs/path/to/cifar10 --output-dir outputs/privacy

runs the tutorial's federation (10 organizations, 5 rounds, 1 CPU per client)
plain, with secure aggregation, with central DP (client-side clipping) at three
noise multipliers and with adaptive clipping, with local DP, and with SecAgg+ and
central DP together. Each run is an ordinary run of the app; the table and plot
go to docs/privacy.md and docs/privacy.png. Takes about 40 minutes on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import federations  # bench/
from federations import later_mean, write_between_markers

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5

RUNS: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "SecAgg+": {"secure-aggregation": True},
    "central DP, z = 0.1": {"dp": "central-fixed", "dp-noise-multiplier": 0.1},
    "central DP, z = 0.5": {"dp": "central-fixed", "dp-noise-multiplier": 0.5},
    "central DP, z = 1.0": {"dp": "central-fixed", "dp-noise-multiplier": 1.0},
    "central DP, adaptive clipping, z = 0.5": {
        "dp": "central-adaptive",
        "dp-noise-multiplier": 0.5,
    },
    "local DP, epsilon 10 a round": {"dp": "local"},
    "SecAgg+ and central DP, z = 0.1": {
        "secure-aggregation": True,
        "dp": "central-fixed",
        "dp-noise-multiplier": 0.1,
    },
}


# Each run's threat model (docs/threat-model.md): who sees an organization's
# update, and what epsilon bounds.
TRUST = {
    "none": ("the server", "nothing"),
    "secure": ("nobody: the server sees the sum", "nothing"),
    "central": ("the server", "the models, for one organization added or removed"),
    "secure central": (
        "nobody: the server sees the sum",
        "the models, for one organization added or removed",
    ),
    "local": ("nobody", "each update, for one organization's data replaced"),
}


def _threat_model(overrides: dict[str, Any]) -> tuple[str, str]:
    dp = overrides.get("dp", "none")
    kind = "local" if dp == "local" else "central" if dp != "none" else ""
    secure = "secure" if overrides.get("secure-aggregation") else ""
    return TRUST[" ".join(w for w in (secure, kind) if w) or "none"]


def _row(name: str, history: dict[str, Any]) -> str:
    rounds = history["rounds"][1:]
    epsilon = rounds[-1].get("epsilon")
    shown = "" if epsilon is None else f"{epsilon:,.1f}"
    seconds = later_mean([r["seconds"] for r in rounds])
    voided = sum("fit_voided" in r for r in rounds)
    sees, bounds = _threat_model(RUNS[name])
    return (
        f"| {name} | {sees} | {bounds} "
        f"| **{rounds[-1]['centralized_accuracy']:.1%}** | {shown} | {voided} "
        f"| {rounds[0]['seconds']:.1f} | {seconds:.1f} |"
    )


def write_report(histories: dict[str, dict[str, Any]]) -> None:
    """Write the table into docs/privacy.md and the plot, docs/privacy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    header = (
        "| run | who sees an organization's update | what epsilon bounds "
        f"| centralized acc, round {ROUNDS} | epsilon at delta = 1e-5 "
        "| rounds voided | round 1 s | later rounds s |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = "\n".join(_row(name, h) for name, h in histories.items())
    write_between_markers(
        ROOT / "docs" / "privacy.md",
        "<!-- table: written by bench/privacy.py -->",
        "<!-- end of table -->",
        f"{header}\n{rows}",
    )
    fig, (accuracy, spent) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for (name, history), color in zip(
        histories.items(), plt.get_cmap("tab10").colors, strict=False
    ):
        rounds = history["rounds"]
        style = {"marker": "o", "markersize": 3, "label": name, "color": color}
        accuracy.plot(
            [r["round"] for r in rounds],
            [r["centralized_accuracy"] for r in rounds],
            **style,
        )
        points = [(r["round"], r["epsilon"]) for r in rounds if "epsilon" in r]
        if points:
            spent.plot(*zip(*points, strict=True), **style)
    accuracy.set(
        xlabel="round",
        ylabel="centralized accuracy (test split)",
        title="10 organizations, 5 rounds",
    )
    spent.set(
        xlabel="round",
        ylabel="epsilon at delta = 1e-5",
        yscale="log",
        title="Privacy spent (Flower's RDP accountant)",
    )
    for ax in (accuracy, spent):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "privacy.png")
    plt.close(fig)


if __name__ == "__main__":
    federations.main(
        __doc__.splitlines()[0], RUNS, {"num-server-rounds": ROUNDS}, write_report
    )
