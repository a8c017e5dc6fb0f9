"""flower_tutorial: how rounds run: FedAvg with guards, reproducible client sampling."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING
from typing import Any

from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from flower_tutorial.aggregation import check_evaluation, check_update, combine
from flower_tutorial.config import PARTITION_ID
from flower_tutorial.recording import RunRecorder


def _describe(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
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
        self.recorder.record(server_round, fit_clients=len(good), fit_failures=reasons)
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
