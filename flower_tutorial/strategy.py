"""flower_tutorial: how rounds run: FedAvg with guards, reproducible client sampling."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING
from typing import Any

from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Message,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import Grid
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from flower_tutorial.aggregation import check_evaluation, check_update, combine
from flower_tutorial.config import PARTITION_ID
from flower_tutorial.recording import RunRecorder


def _describe(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        text = f"{type(failure).__name__}: {failure}"
        # Flower's words for a message whose TTL (the round-timeout) ran out.
        if "expired due to its TTL" in text:
            return f"no reply within round-timeout ({text})"
        return text
    return failure[1].status.message


def _by_partition(results: list) -> list:
    # Results arrive in completion order; summing in a fixed order keeps the
    # average bit-identical between runs.
    return sorted(results, key=lambda r: (r[1].metrics.get(PARTITION_ID, -1), r[0].cid))


def _sort_out(
    stage: str,
    server_round: int,
    results: list,
    failures: list,
    check: Callable[[Any], str | None],
) -> tuple[list, list[str]]:
    """Split results into sound ones and reasons for the rest (failures included).

    Raises when nothing sound is left: averaging nothing would silently carry on.
    """
    good, reasons = [], [_describe(f) for f in failures]
    for proxy, res in _by_partition(results):
        reason = check(res)
        if reason is None:
            good.append((proxy, res))
        else:
            reasons.append(f"partition {res.metrics.get(PARTITION_ID, '?')}: {reason}")
    for reason in reasons:
        log(
            WARNING,
            "Round %s (%s): a client was left out: %s",
            server_round,
            stage,
            reason,
        )
    if reasons and not good:
        raise RuntimeError(
            f"All {len(reasons)} clients failed in round {server_round} ({stage}); "
            f"the first said: {reasons[0]}"
        )
    return good, reasons


class TutorialFedAvg(FedAvg):
    """FedAvg that checks every update and never averages nothing.

    An update with the wrong arrays, shapes or dtypes, non-finite values or no
    examples is left out like a client that failed, and the history says which
    and why; the round goes on with the rest. When every client of a round failed,
    the run ends with the first error: Flower's FedAvg would skip the round and
    carry on, so a setting that breaks every client (a wrong dataset path, say)
    would run all rounds and report nothing. Results are combined in partition
    order, with FedAvg's weighted mean or a robust rule (`aggregation`).
    """

    def __init__(
        self,
        *,
        recorder: RunRecorder,
        aggregation: str = "fedavg",
        trim_fraction: float = 0.2,
        krum_byzantine: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.krum_byzantine = krum_byzantine
        self.global_arrays: NDArrays = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Keep the global model sent out: updates are checked against it."""
        self.global_arrays = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Combine the sound updates; record the others with their reasons."""
        good, reasons = _sort_out(
            "fit",
            server_round,
            results,
            failures,
            lambda res: check_update(res, self.global_arrays),
        )
        # Examples per organization: how much each update weighed in the average.
        examples: dict[str, int] = {}
        for proxy, res in good:
            key = str(res.metrics.get(PARTITION_ID, proxy.cid))
            if key in examples:  # two nodes set up with the same partition-id
                key = f"{key} (node {proxy.cid})"
            examples[key] = res.num_examples
        self.recorder.record(
            server_round,
            fit_clients=len(good),
            fit_examples=examples,
            fit_failures=reasons,
        )
        if not good:
            return None, {}
        arrays = combine(
            self.aggregation, good, self.trim_fraction, self.krum_byzantine
        )
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn:
            metrics = self.fit_metrics_aggregation_fn(
                [(r.num_examples, r.metrics) for _, r in good]
            )
        return ndarrays_to_parameters(arrays), metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the sound losses and metrics; record the others."""
        good, reasons = _sort_out(
            "evaluate", server_round, results, failures, check_evaluation
        )
        self.recorder.record(
            server_round, evaluate_clients=len(good), evaluate_failures=reasons
        )
        return super().aggregate_evaluate(server_round, good, [])

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate centrally (if configured) and record the result."""
        res = super().evaluate(server_round, parameters)
        if res is not None:
            loss, metrics = res
            self.recorder.record(
                server_round,
                centralized_loss=loss,
                centralized_accuracy=metrics.get("accuracy"),
            )
        return res


class RunStoppedError(RuntimeError):
    """The run was stopped (Ctrl-C, or the simulation ended) while it waited."""


class StoppableGrid:
    """A Grid whose wait for replies ends as soon as the run is stopped.

    Flower's client proxies wait for each reply without a timeout (the message's
    TTL, `round-timeout`, ends it). Once a run is stopped (Ctrl-C in
    `run_tutorial_simulation`) nothing replies any more, and those waits would
    keep the ServerApp's threads, and so the process, alive until then.
    """

    def __init__(self, grid: Grid, stopped: threading.Event) -> None:
        self._grid = grid
        self._stopped = stopped
        # As often as the wrapped Grid polls: 0.1 s in memory, 3 s over HTTP.
        self._interval = float(getattr(grid, "pull_interval", 3.0))

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped Grid's."""
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push `messages`, then pull replies until all came, time ran out or stop."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            for reply in list(self._grid.pull_messages(list(pending))):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or (deadline is not None and time.monotonic() > deadline):
                return replies
            if self._stopped.wait(self._interval):
                raise RunStoppedError("The run was stopped while waiting for replies.")


class BoundedClientManager(SimpleClientManager):
    """Samples SuperNodes reproducibly, after a bounded wait for enough of them.

    Flower's SimpleClientManager waits up to a day for the strategy's minimum
    number of nodes, and silently skips a round when fewer are connected than it
    samples. Here either case ends the run with a message saying what to change.
    Flower gives SuperNodes new random IDs every run, so sampling orders them by
    the partition they hold before drawing with a generator seeded by the run's
    seed. The partition comes from a node's results or, when a round samples a
    subset before all were heard from, from asking the node once (get_properties).
    """

    def __init__(self, timeout: float, seed: int) -> None:
        super().__init__()
        self.timeout = timeout
        self.partition_ids: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._stopped = threading.Event()

    def register(self, client: ClientProxy) -> bool:
        """Register a node, making its waits for replies end when the run stops."""
        if hasattr(client, "grid"):  # Flower's GridClientProxy
            client.grid = StoppableGrid(client.grid, self._stopped)
        return super().register(client)

    def stop(self) -> None:
        """End every wait of this run: for nodes, and for their replies."""
        self._stopped.set()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        """Wait (at most `timeout` s) until `num_clients` nodes are connected."""
        with self._cv:
            self._cv.wait_for(
                lambda: self._stopped.is_set() or len(self.clients) >= num_clients,
                timeout=timeout,
            )
        if self._stopped.is_set():
            raise RunStoppedError("The run was stopped while waiting for SuperNodes.")
        return len(self.clients) >= num_clients

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        """Sample `num_clients` nodes after waiting (bounded) for enough of them."""
        needed = max(num_clients, min_num_clients or 0)
        if not self.wait_for(needed, timeout=self.timeout):
            raise RuntimeError(
                f"The strategy needs {needed} SuperNodes but only {len(self)} "
                f"connected within node-wait-timeout = {self.timeout:g} s. In "
                f"simulation, set the federation size, e.g. `flwr run . "
                f'--federation-config "num-supernodes={needed}"`; in a deployment, '
                f"start more SuperNodes; or lower min-fit-clients, "
                f"min-evaluate-clients and min-available-clients."
            )
        # A snapshot: Flower's background thread may register nodes meanwhile.
        clients = dict(self.clients)
        if criterion is not None:
            clients = {c: p for c, p in clients.items() if criterion.select(p)}
        if num_clients > len(clients):
            return []
        if num_clients < len(clients):
            # Only a true subset depends on the order; all-of-them does not.
            self._learn_partitions(clients)
        cids = sorted(clients, key=lambda cid: (self.partition_ids.get(cid, -1), cid))
        return [clients[cid] for cid in self._rng.sample(cids, num_clients)]

    def _learn_partitions(self, clients: dict[str, ClientProxy]) -> None:
        """Ask the nodes not heard from yet which partition they hold (once each)."""
        unknown = [
            proxy for cid, proxy in clients.items() if cid not in self.partition_ids
        ]
        if not unknown:
            return
        ins = GetPropertiesIns(config={})
        with ThreadPoolExecutor() as pool:
            replies = pool.map(
                lambda proxy: proxy.get_properties(ins, self.timeout, group_id=0),
                unknown,
            )
            for proxy, reply in zip(unknown, replies, strict=True):
                self.partition_ids[proxy.cid] = int(reply.properties[PARTITION_ID])
