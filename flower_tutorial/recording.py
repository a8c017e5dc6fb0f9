"""flower_tutorial: what a run leaves behind: history.json, models, plots, progress.

`RunRecorder` is called by the strategy alone (strategy.py), from the methods that
every Flower loop calls, the legacy Server's and `DefaultWorkflow`'s alike.
"""

from __future__ import annotations

import time
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.common import NDArrays, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.logger import log

from flower_tutorial import checkpoint
from flower_tutorial.config import DataSettings
from flower_tutorial.data import (
    IMAGE_KEY,
    LABEL_KEY,
    decoded_test_split,
    label_counts,
)
from flower_tutorial.outputs import RunFolderLock, save_model, write_json
from flower_tutorial.plots import (
    plot_batch,
    plot_curves,
    plot_label_distribution,
    plot_organizations,
)
from flower_tutorial.task import Net, load_data, set_parameters, set_seed

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# history.json's per-round numbers, and their TensorBoard tags.
TENSORBOARD_TAGS = {
    "train_loss": "loss/training",
    "distributed_loss": "loss/federated",
    "centralized_loss": "loss/centralized",
    "distributed_accuracy": "accuracy/federated",
    "centralized_accuracy": "accuracy/centralized",
    "seconds": "time/round seconds",
    "epsilon": "privacy/epsilon",
    "clipping_norm": "privacy/clipping norm",
}
AXIS_LABELS = {
    "accuracy": "accuracy",
    "loss": "cross-entropy loss",
    "epsilon": "privacy spent, epsilon",
}
# More partitions than this make the label plot unreadable, and slow to draw.
MAX_PLOTTED_PARTITIONS = 1000


class RunRecorder:
    """Collects per-round metrics and times, and writes them as the run goes.

    history.json is rewritten atomically after every round, so an interrupted run
    still leaves a readable record of the rounds it finished. After the last
    round come final_model.pt and the plots.
    """

    def __init__(
        self,
        run_dir: Path,
        run_config: dict[str, Scalar],
        data: DataSettings,
        num_rounds: int,
        save_best_model: bool,
        lock: RunFolderLock | None = None,
    ) -> None:
        self.run_dir = run_dir
        self._lock = lock  # held until the run's last file is written
        self.run_config = run_config
        self.data = data
        self.num_rounds = num_rounds
        self.save_best_model = save_best_model
        self.rounds: dict[int, dict[str, Any]] = {}
        self.best: tuple[float, int] | None = None  # (accuracy, round)
        self.num_partitions: int | None = None
        self.nodes_left_out: list[str] = []
        self.finished = False  # True once the last round is recorded
        self.stopped_early: str | None = None  # why the run ended before num_rounds
        self.resumed: list[dict[str, Any]] = []  # after which rounds, and when
        self._tensorboard: SummaryWriter | None = None
        self._round_started: dict[int, float] = {}
        self._run_started = time.monotonic()

    def start_round(self, server_round: int) -> None:
        """Note when a round starts (round 0 is the initial model's evaluation)."""
        self._round_started[server_round] = time.monotonic()
        self.rounds[server_round] = {"round": server_round}

    def record(self, server_round: int, **values: Any) -> None:
        """Add metrics of a round; None values are kept as JSON null."""
        self.rounds.setdefault(server_round, {"round": server_round}).update(values)

    def record_federation(
        self, num_partitions: int | None, nodes_left_out: list[str]
    ) -> None:
        """Note the federation's number of partitions, and the nodes left out."""
        self.num_partitions = num_partitions
        self.nodes_left_out = nodes_left_out

    def restore(self, history: dict[str, Any], server_round: int) -> None:
        """Go on from a checkpoint's history, after its round `server_round`."""
        self.rounds = {r["round"]: r for r in history["rounds"]}
        self.num_partitions = history["num_partitions"]
        self.nodes_left_out = history["nodes_left_out"]
        self.resumed = [
            *history.get("resumed", []),
            {
                "after_round": server_round,
                "at": datetime.now().isoformat("T", "seconds"),
            },
        ]
        best = history["best_round"]
        if best is not None:
            self.best = (_accuracy(self.rounds[best]), best)
        log(INFO, "Resuming %s after round %s.", self.run_dir, server_round)

    def end_round(
        self,
        server_round: int,
        parameters: Parameters,
        state: dict[str, Any] | None = None,
    ) -> None:
        """Log the round's progress line, keep the best model, write history.json.

        `parameters` is the global model after the round; after the last round it
        is saved as final_model.pt, and the plots are drawn. Then it is saved with
        `state` (what else the next rounds depend on) as the run's checkpoint.
        """
        entry = self.rounds.setdefault(server_round, {"round": server_round})
        if server_round == 0 and len(entry) == 1:
            del self.rounds[0]  # no centralized evaluation: round 0 has nothing
            return
        started = self._round_started[server_round]
        entry["seconds"] = round(time.monotonic() - started, 3)
        arrays = parameters_to_ndarrays(parameters)
        accuracy = _accuracy(entry)
        # Round 0 counts: when fine-tuning, the checkpoint may stay the best model.
        improved = accuracy is not None and (
            self.best is None or accuracy > self.best[0]
        )
        if self.save_best_model and improved:
            self.best = (accuracy, server_round)
            save_model(_net(arrays), self.run_dir / "best_model.pt")
        log(INFO, "%s", progress_line(entry, self.num_rounds))
        self._write_scalars(entry)
        if server_round == self.num_rounds:
            self._finish(arrays)
        history = self.write_history()
        if state is not None:
            # Last: a checkpoint says that all of its round is on disk. A run killed
            # before it resumes from the round before, and redoes this one.
            checkpoint.save(
                checkpoint.Checkpoint(server_round, arrays, history, **state),
                self.run_dir,
            )
        if self.finished:
            self._release()

    def _write_scalars(self, entry: dict[str, Any]) -> None:
        """Write the round's numbers as TensorBoard scalars, into the run's folder.

        `tensorboard --logdir <output-dir>` then shows every run side by side.
        """
        if self._tensorboard is None:  # imported only by a run that records one
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir))
        step = entry["round"]
        for key, tag in TENSORBOARD_TAGS.items():
            if entry.get(key) is not None:
                self._tensorboard.add_scalar(tag, entry[key], step)
        for per_organization, name in (
            ("fit_train_loss", "training loss"),
            ("fit_examples", "examples"),
            ("evaluate_loss", "validation loss"),
            ("evaluate_accuracy", "validation accuracy"),
        ):
            for organization, value in entry.get(per_organization, {}).items():
                tag = f"organization {organization}/{name}"
                self._tensorboard.add_scalar(tag, value, step)
        self._tensorboard.flush()

    def stop_early(self, last_round: int, parameters: Parameters, why: str) -> None:
        """End the run after `last_round`: save the final model and plots now."""
        self.stopped_early = f"after round {last_round}: {why}"
        self._finish(parameters_to_ndarrays(parameters))
        self.write_history()
        self._release()

    def _release(self) -> None:
        """Let the run folder go: everything of the run is written."""
        if self._lock is not None:
            self._lock.release()

    def write_history(self) -> dict[str, Any]:
        """Write history.json (atomically) with every round so far; return it."""
        history = {
            "run_config": self.run_config,
            "stopped_early": self.stopped_early,
            "resumed": self.resumed,
            "num_partitions": self.num_partitions,
            "nodes_left_out": self.nodes_left_out,
            "best_round": self.best[1] if self.best else None,
            "organizations": self.organizations(),
            "seconds": round(time.monotonic() - self._run_started, 3),
            "rounds": [self.rounds[r] for r in sorted(self.rounds)],
        }
        write_json(history, self.run_dir / "history.json")
        return history

    def _finish(self, arrays: NDArrays) -> None:
        """Save the final model `arrays` and the plots; log where everything is."""
        save_model(_net(arrays), self.run_dir / "final_model.pt")
        if self.save_best_model and self.best is None:
            log(
                WARNING,
                "No accuracy was measured (centralized-evaluation off and "
                "fraction-evaluate 0): no best_model.pt, only final_model.pt.",
            )
        self._plot_metrics()
        self._plot_organizations()
        self._plot_data()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self.finished = True
        summary = self.organizations()
        if summary is not None:
            log(
                INFO,
                "Organizations in round %s (federated evaluation): worst %.2f%% "
                "(partition %s), median %.2f%%, best %.2f%% (partition %s), of %s",
                summary["round"],
                100 * summary["worst"],
                summary["worst_organization"],
                100 * summary["median"],
                100 * summary["best"],
                summary["best_organization"],
                summary["organizations"],
            )
        log(INFO, "Run outputs (history.json, models, plots): %s", self.run_dir)

    def organizations(self) -> dict[str, Any] | None:
        """Return the spread of the organizations' accuracy in the last round of it.

        None when no round recorded an accuracy per organization (none evaluated,
        or under DP without dp-client-metrics).
        """
        for server_round, entry in sorted(self.rounds.items(), reverse=True):
            accuracies = entry.get("evaluate_accuracy")
            if accuracies:
                return {
                    "round": server_round,
                    "organizations": len(accuracies),
                    **spread(accuracies),
                }
        return None

    def _plot_organizations(self) -> None:
        """Each organization's accuracy, round by round (where it evaluated)."""
        names = sorted(
            {
                name
                for entry in self.rounds.values()
                for name in entry.get("evaluate_accuracy", {})
            },
            key=_organization_order,
        )
        rounds = [
            r
            for r, entry in sorted(self.rounds.items())
            if entry.get("evaluate_accuracy")
        ]
        if not names or len(names) > MAX_PLOTTED_PARTITIONS:
            return
        grid = [
            [self.rounds[r]["evaluate_accuracy"].get(name) for r in rounds]
            for name in names
        ]
        plot_organizations(grid, names, rounds, self.run_dir / "organizations.png")

    def _series(self, key: str) -> list[tuple[float, float]]:
        return [
            (r, entry[key])
            for r, entry in sorted(self.rounds.items())
            if entry.get(key) is not None
        ]

    def _plot_metrics(self) -> None:
        """Accuracy and loss per round, distributed and centralized on one figure."""
        sources = {
            "federated (clients' validation data)": "distributed",
            "centralized (test split)": "centralized",
        }
        accuracy = {k: self._series(f"{v}_accuracy") for k, v in sources.items()}
        loss = {k: self._series(f"{v}_loss") for k, v in sources.items()}
        loss["training (clients, during fit)"] = self._series("train_loss")
        epsilon = {"epsilon at dp-delta": self._series("epsilon")}
        for name, series in (
            ("accuracy", accuracy),
            ("loss", loss),
            ("epsilon", epsilon),
        ):
            if any(series.values()):  # no evaluation at all: nothing to draw
                plot_curves(
                    series,
                    "round",
                    AXIS_LABELS[name],
                    f"{name.capitalize()} of the global model",
                    self.run_dir / f"{name}.png",
                )

    def _plot_data(self) -> None:
        """Plot the tutorial's batch grid of partition 0 and the labels per partition.

        Needs the dataset on the server and the federation size, which the
        clients report; either missing (e.g. a deployment whose server has no
        data) skips these two plots with a warning.
        """
        if self.num_partitions is None:
            log(WARNING, "No client reported num-partitions: data plots skipped.")
            return
        if self.num_partitions > MAX_PLOTTED_PARTITIONS:
            log(
                WARNING,
                "Data plots skipped: %s partitions, more than the %s they can show.",
                self.num_partitions,
                MAX_PLOTTED_PARTITIONS,
            )
            return
        try:
            names = decoded_test_split(self.data, "cpu").class_names
            counts = label_counts(self.data, self.num_partitions)
            trainloader = load_data(0, self.num_partitions, self.data)[0]
        except (OSError, ValueError) as err:
            log(WARNING, "Data plots skipped, the server cannot load the data: %s", err)
            return
        plot_label_distribution(counts, names, self.run_dir / "label_distribution.png")
        # The tutorial's picture: a training batch of partition 0, with classes.
        set_seed(self.data.seed)
        batch = next(iter(trainloader))
        plot_batch(
            batch[IMAGE_KEY], batch[LABEL_KEY], names, self.run_dir / "batch.png"
        )


def _organization_order(name: str) -> tuple[int, str]:
    """Sort organizations by partition number (names like '3' or '3 (node 12)')."""
    number = name.split(" ", 1)[0]
    return (int(number) if number.isdigit() else -1, name)


def _net(arrays: NDArrays) -> Net:
    """Return a Net holding the global model's `arrays`."""
    net = Net()
    set_parameters(net, arrays)
    return net


def _accuracy(entry: dict[str, Any]) -> float | None:
    """Return a round's accuracy: centralized (test split), else federated."""
    return entry.get("centralized_accuracy", entry.get("distributed_accuracy"))


def spread(accuracies: dict[str, float]) -> dict[str, Any]:
    """Return the organizations' worst, median and best accuracy, and who they are.

    The worst is whom the global model serves worst; a median of an even count
    is the mean of the middle two.
    """
    ranked = sorted(accuracies.items(), key=lambda item: (item[1], item[0]))
    values = [acc for _, acc in ranked]
    middle = len(values) // 2
    median = (
        values[middle] if len(values) % 2 else sum(values[middle - 1 : middle + 1]) / 2
    )
    return {
        "worst": values[0],
        "worst_organization": ranked[0][0],
        "median": median,
        "best": values[-1],
        "best_organization": ranked[-1][0],
    }


def progress_line(entry: dict[str, Any], num_rounds: int) -> str:
    """One readable line per round: number, time and the headline metrics.

    Where organizations evaluated, their worst, median and best accuracy follow
    the federated mean, which hides the worst.
    """
    parts = [f"[round {entry['round']}/{num_rounds}] {entry['seconds']:.1f} s"]
    for key, label in (
        ("train_loss", "train loss"),
        ("distributed_loss", "federated loss"),
        ("distributed_accuracy", "federated acc"),
        ("centralized_loss", "centralized loss"),
        ("centralized_accuracy", "centralized acc"),
        ("epsilon", "epsilon"),
    ):
        value = entry.get(key)
        if value is not None:
            if "acc" in label:
                shown = f"{100 * value:.2f}%"
            else:
                shown = f"{value:.4f}" if "loss" in label else f"{value:.3g}"
            parts.append(f"{label} {shown}")
        if (
            key == "distributed_accuracy"
            and len(entry.get("evaluate_accuracy", {})) > 1
        ):
            parts[-1] += " ({worst} worst, {median} median, {best} best)".format(
                **{
                    k: f"{100 * v:.2f}%"
                    for k, v in spread(entry["evaluate_accuracy"]).items()
                    if k in ("worst", "median", "best")
                }
            )
    return " | ".join(parts)
