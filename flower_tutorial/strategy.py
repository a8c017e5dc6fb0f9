"""flower_tutorial: how rounds run: FedAvg with guards, reproducible client sampling."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from flwr.common import EvaluateRes, FitRes, GetPropertiesIns, Parameters, Scalar
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from flower_tutorial.config import PARTITION_ID
from flower_tutorial.recording import RunRecorder


def _describe(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    return failure[1].status.message


def _raise_if_all_failed(
    stage: str, server_round: int, results: list, failures: list
) -> None:
    if failures and not results:
        raise RuntimeError(
            f"All {len(failures)} clients failed in round {server_round} ({stage}); "
            f"the first said: {_describe(failures[0])}"
        )


def _by_partition(results: list) -> list:
    # Results arrive in completion order; summing in a fixed order keeps the
    # average bit-identical between runs.
    return sorted(results, key=lambda r: (r[1].metrics.get(PARTITION_ID, -1), r[0].cid))


class TutorialFedAvg(FedAvg):
    """FedAvg that ends the run when every client of a round failed.

    Flower's FedAvg skips such a round and carries on, so a setting that breaks
    every client (a wrong dataset path, say) would run all rounds and report
    nothing. Rounds where only some clients fail still go on, as in FedAvg.
    Results are averaged in partition order, and centralized evaluations are
    recorded for the run's history.
    """

    def __init__(self, *, recorder: RunRecorder, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Average the results; raise if there are none but failures."""
        _raise_if_all_failed("fit", server_round, results, failures)
        return super().aggregate_fit(server_round, _by_partition(results), failures)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the losses and metrics; raise if there are none but failures."""
        _raise_if_all_failed("evaluate", server_round, results, failures)
        return super().aggregate_evaluate(
            server_round, _by_partition(results), failures
        )

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
