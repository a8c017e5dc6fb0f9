"""flower_tutorial: what a run leaves behind: history.json, models and plots."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import Parameters, Scalar, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import History, Server
from flwr.server.client_proxy import ClientProxy

from flower_tutorial.config import NUM_PARTITIONS, PARTITION_ID, DataSettings
from flower_tutorial.plots import plot_batch, plot_curves, plot_label_distribution
from flower_tutorial.task import (
    IMAGE_KEY,
    LABEL_KEY,
    Net,
    class_names,
    label_counts,
    load_data,
    set_parameters,
    set_seed,
)


def make_run_dir(output_dir: str, run_id: int | str) -> Path:
    """Create this run's own output folder under `output_dir`, or explain why not."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir).expanduser().resolve() / f"{stamp}-{run_id}"
    run_dir = base
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        # Two runs may start in the same second with the same id (run_simulation).
        for attempt in itertools.count(2):
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                run_dir = base.with_name(f"{base.name}-{attempt}")
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # leave nothing behind
        raise ValueError(
            f"run config key 'output-dir' = {output_dir!r} is not allowed: "
            f"cannot create a writable folder {str(run_dir)!r} there ({err})."
        ) from err
    return run_dir


def load_checkpoint(path: str) -> Net:
    """Return a Net holding a saved state_dict, or explain why it cannot."""
    net = Net()
    try:
        state_dict = torch.load(Path(path).expanduser(), map_location="cpu")
        net.load_state_dict(state_dict)
    except Exception as err:  # any failure means the same to the user
        raise ValueError(
            f"run config key 'initial-checkpoint' = {path!r} could not be loaded as "
            f"a state_dict of the tutorial's Net: {type(err).__name__}: {err}"
        ) from err
    return net


def write_json(obj: Any, path: Path) -> None:
    """Write JSON through a temporary file, so `path` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_model(parameters: Parameters, path: Path) -> None:
    """Save global parameters as a Net state_dict (`torch.load` + `load_state_dict`).

    Through a temporary file, like history.json: an interrupted run never leaves a
    truncated model behind.
    """
    net = Net()
    set_parameters(net, parameters_to_ndarrays(parameters))
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)


class RunRecorder:
    """Collects per-round metrics and times, and writes them as the run goes.

    history.json is rewritten atomically after every round, so an interrupted run
    still leaves a readable record of the rounds it finished.
    """

    def __init__(
        self,
        run_dir: Path,
        run_config: dict[str, Scalar],
        data: DataSettings,
        num_rounds: int,
        save_best_model: bool,
    ) -> None:
        self.run_dir = run_dir
        self.run_config = run_config
        self.data = data
        self.num_rounds = num_rounds
        self.save_best_model = save_best_model
        self.rounds: dict[int, dict[str, Any]] = {}
        self.best: tuple[float, int] | None = None  # (accuracy, round)
        self.num_partitions: int | None = None
        self._round_started: dict[int, float] = {}
        self._run_started = time.monotonic()

    def start_round(self, server_round: int) -> None:
        """Note when a round starts (round 0 is the initial model's evaluation)."""
        self._round_started[server_round] = time.monotonic()
        self.rounds[server_round] = {"round": server_round}

    def record(self, server_round: int, **values: Any) -> None:
        """Add metrics of a round; None values are kept as JSON null."""
        self.rounds.setdefault(server_round, {"round": server_round}).update(values)

    def end_round(self, server_round: int, parameters: Parameters) -> None:
        """Log the round's progress line, keep the best model, write history.json."""
        entry = self.rounds.setdefault(server_round, {"round": server_round})
        if server_round == 0 and len(entry) == 1:
            del self.rounds[0]  # no centralized evaluation: round 0 has nothing
            return
        started = self._round_started[server_round]
        entry["seconds"] = round(time.monotonic() - started, 3)
        log(INFO, "%s", progress_line(entry, self.num_rounds))
        accuracy = entry.get("centralized_accuracy", entry.get("distributed_accuracy"))
        # Round 0 counts: when fine-tuning, the checkpoint may stay the best model.
        improved = accuracy is not None and (
            self.best is None or accuracy > self.best[0]
        )
        if self.save_best_model and improved:
            self.best = (accuracy, server_round)
            save_model(parameters, self.run_dir / "best_model.pt")
        self.write_history()

    def write_history(self) -> None:
        """Write history.json (atomically) with every round so far."""
        history = {
            "run_config": self.run_config,
            "num_partitions": self.num_partitions,
            "best_round": self.best[1] if self.best else None,
            "seconds": round(time.monotonic() - self._run_started, 3),
            "rounds": [self.rounds[r] for r in sorted(self.rounds)],
        }
        write_json(history, self.run_dir / "history.json")

    def finish(self, parameters: Parameters) -> None:
        """Save the final model and the plots; log where everything is."""
        save_model(parameters, self.run_dir / "final_model.pt")
        if self.save_best_model and self.best is None:
            log(
                WARNING,
                "No accuracy was measured (centralized-evaluation off and "
                "fraction-evaluate 0): no best_model.pt, only final_model.pt.",
            )
        self.plot_metrics()
        self.plot_data()
        self.write_history()
        log(INFO, "Run outputs (history.json, models, plots): %s", self.run_dir)

    def _series(self, key: str) -> list[tuple[float, float]]:
        return [
            (r, entry[key])
            for r, entry in sorted(self.rounds.items())
            if entry.get(key) is not None
        ]

    def plot_metrics(self) -> None:
        """Accuracy and loss per round, distributed and centralized on one figure."""
        sources = {
            "federated (clients' validation data)": "distributed",
            "centralized (test split)": "centralized",
        }
        accuracy = {k: self._series(f"{v}_accuracy") for k, v in sources.items()}
        loss = {k: self._series(f"{v}_loss") for k, v in sources.items()}
        loss["training (clients, during fit)"] = self._series("train_loss")
        for name, series in (("accuracy", accuracy), ("loss", loss)):
            if any(series.values()):  # no evaluation at all: nothing to draw
                plot_curves(
                    series,
                    "round",
                    name if name == "accuracy" else "cross-entropy loss",
                    f"{name.capitalize()} of the global model",
                    self.run_dir / f"{name}.png",
                )

    def plot_data(self) -> None:
        """Plot the tutorial's batch grid of partition 0 and the labels per partition.

        Needs the dataset on the server and the federation size, which the
        clients report; either missing (e.g. a deployment whose server has no
        data) skips these two plots with a warning.
        """
        if self.num_partitions is None:
            log(WARNING, "No client reported num-partitions: data plots skipped.")
            return
        try:
            names = class_names(self.data)
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


def progress_line(entry: dict[str, Any], num_rounds: int) -> str:
    """One readable line per round: number, time and the headline metrics."""
    parts = [f"[round {entry['round']}/{num_rounds}] {entry['seconds']:.1f} s"]
    for key, label in (
        ("train_loss", "train loss"),
        ("distributed_loss", "federated loss"),
        ("distributed_accuracy", "federated acc"),
        ("centralized_loss", "centralized loss"),
        ("centralized_accuracy", "centralized acc"),
    ):
        value = entry.get(key)
        if value is not None:
            shown = f"{100 * value:.2f}%" if "acc" in label else f"{value:.4f}"
            parts.append(f"{label} {shown}")
    return " | ".join(parts)


class RecordingServer(Server):
    """Flower's Server, recording each round and writing the run's outputs.

    It also learns which partition each SuperNode holds from the clients'
    metrics, so that the client manager can sample reproducibly by partition.
    """

    def __init__(self, *, recorder: RunRecorder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.history: History | None = None

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Run all rounds, then save the final model and the plots."""
        self.recorder.start_round(0)
        self.history, elapsed = super().fit(num_rounds, timeout)
        self.recorder.finish(self.parameters)
        return self.history, elapsed

    def fit_round(self, server_round: int, timeout: float | None):  # noqa: ANN201
        """Train one round and record what came back."""
        if server_round == 1:
            # Round 0 (the initial model's centralized evaluation) ends here.
            self.recorder.end_round(0, self.parameters)
        self.recorder.start_round(server_round)
        res = super().fit_round(server_round, timeout)
        if res is not None:
            _, metrics, (results, _) = res
            self._learn_partitions(results)
            self.recorder.record(server_round, train_loss=metrics.get("train_loss"))
        return res

    def evaluate_round(self, server_round: int, timeout: float | None):  # noqa: ANN201
        """Evaluate on the clients, then close the round's record."""
        res = super().evaluate_round(server_round, timeout)
        if res is not None:
            loss, metrics, (results, _) = res
            self._learn_partitions(results)
            self.recorder.record(
                server_round,
                distributed_loss=loss,
                distributed_accuracy=metrics.get("accuracy"),
            )
        self.recorder.end_round(server_round, self.parameters)
        return res

    def _learn_partitions(self, results: list[tuple[ClientProxy, Any]]) -> None:
        manager = self.client_manager()
        for proxy, res in results:
            if PARTITION_ID in res.metrics:
                manager.partition_ids[proxy.cid] = int(res.metrics[PARTITION_ID])
            if NUM_PARTITIONS in res.metrics:
                self.recorder.num_partitions = int(res.metrics[NUM_PARTITIONS])
