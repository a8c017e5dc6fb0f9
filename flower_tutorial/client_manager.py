"""flower_tutorial: which SuperNodes there are, what each holds, which are asked.

The client manager alone knows which partition a SuperNode holds: it asks every
node once (`get_properties`) before sampling. It waits, boundedly, for enough
nodes, and samples them reproducibly. Flower's loops (the legacy Server, or
`DefaultWorkflow`) and the strategy call it.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING
from typing import Any

from flwr.common import GetPropertiesIns
from flwr.common.logger import log
from flwr.server import Grid
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

from flower_tutorial.checks import cut, shown
from flower_tutorial.config import NUM_PARTITIONS, PARTITION_ID
from flower_tutorial.stopping import RunStoppedError, StoppableGrid


class SeededClientManager(SimpleClientManager):
    """Samples SuperNodes reproducibly, after a bounded wait for enough of them.

    Flower's SimpleClientManager waits up to a day for the strategy's minimum
    number of nodes, and silently skips a round when fewer are connected than it
    samples. Here either case ends the run with a message saying what to change.
    Flower gives SuperNodes new random IDs every run, so sampling orders them by
    the partition they hold before drawing with a generator seeded by the run's
    seed. A node that cannot say which partition it holds is never sampled; two
    nodes that name the same partition are both sampled, with a warning.
    """

    def __init__(self, timeout: float, seed: int) -> None:
        super().__init__()
        self.timeout = timeout
        # cid -> (partition-id, num-partitions), as each node told when asked.
        self._identities: dict[str, tuple[int, int]] = {}
        # cid -> why the node could not be identified (it is never sampled).
        self.unidentified: dict[str, str] = {}
        # Why the last `sample` took fewer nodes than asked: nodes above.
        self._unsampled: list[str] = []
        self._rng = random.Random(seed)
        self._stopped = threading.Event()

    def register(self, client: ClientProxy) -> bool:
        """Register a node, making its waits for replies end when the run stops."""
        # Flower's GridClientProxy; under SecAgg+ its grid is stoppable already.
        if hasattr(client, "grid") and not isinstance(client.grid, StoppableGrid):
            client.grid = self.stoppable(client.grid)
        return super().register(client)

    def stoppable(self, grid: Grid, timeout: float | None = None) -> StoppableGrid:
        """Return `grid`, its waits for replies ended by `stop` (and `timeout`)."""
        return StoppableGrid(grid, self._stopped, timeout)

    def stop(self) -> None:
        """End every wait of this run: for nodes, and for their replies."""
        self._stopped.set()
        with self._cv:
            self._cv.notify_all()

    def sampler_state(self) -> Any:
        """Return the sampling generator's state, for a checkpoint."""
        return self._rng.getstate()

    def restore_sampler(self, state: Any) -> None:
        """Draw on from a checkpoint's sampling state."""
        self._rng.setstate(state)

    def unsampled(self) -> list[str]:
        """Return, and forget, why the last sample took fewer nodes than asked."""
        reasons, self._unsampled = self._unsampled, []
        return reasons

    def partition_id(self, cid: str) -> int | None:
        """Return the partition the node `cid` holds (None: not asked yet)."""
        identity = self._identities.get(cid)
        return None if identity is None else identity[0]

    @property
    def num_partitions(self) -> int | None:
        """Return the federation's number of partitions, as most nodes report it."""
        sizes = Counter(size for _, size in self._identities.values())
        # Most nodes win; of equally many, the smaller count: a liar cannot inflate it.
        return min(sizes, key=lambda size: (-sizes[size], size)) if sizes else None

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
        """Sample `num_clients` nodes after waiting (bounded) for enough of them.

        A node that could not say which partition it holds costs its own place
        and no other's: it is never asked, and where it leaves the round short
        of `num_clients`, it counts as a failed client of the round (its reason
        in `unsampled()`), as a client failing in `fit` would. Only when no
        node can say which partition it holds does the run end.
        """
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
        self._identify(clients)
        usable = sorted(
            (cid for cid in clients if cid in self._identities),
            key=lambda cid: (self._identities[cid][0], cid),
        )
        unidentified = [why for cid, why in self.unidentified.items() if cid in clients]
        if not usable:
            raise RuntimeError(
                f"All {len(clients)} SuperNodes failed when asked which "
                f"partition they hold; the first said: {unidentified[0]}"
            )
        count = min(num_clients, len(usable))
        self._unsampled = unidentified[: num_clients - count]
        return [clients[cid] for cid in self._rng.sample(usable, count)]

    def _identify(self, clients: dict[str, ClientProxy]) -> None:
        """Ask the nodes not asked yet which partition they hold (once each)."""
        unknown = [
            proxy
            for cid, proxy in clients.items()
            if cid not in self._identities and cid not in self.unidentified
        ]
        if not unknown:
            return
        ins = GetPropertiesIns(config={})

        def ask(proxy: ClientProxy) -> tuple[int, int] | str:
            try:
                reply = proxy.get_properties(ins, self.timeout, group_id=0)
            except Exception as ex:  # a node's failure must not end the run
                return f"get_properties failed: {type(ex).__name__}: {cut(str(ex))}"
            return _identity(reply.properties)

        with ThreadPoolExecutor() as pool:
            answers = list(pool.map(ask, unknown))
        for proxy, answer in zip(unknown, answers, strict=True):
            if isinstance(answer, str):
                self._leave_out(proxy.cid, answer)
            else:
                self._identities[proxy.cid] = answer
        # A node that splits the data otherwise than most would train on the
        # wrong share of it.
        agreed = self.num_partitions
        for cid, (_, size) in list(self._identities.items()):
            if size != agreed:
                del self._identities[cid]
                self._leave_out(
                    cid,
                    f"{NUM_PARTITIONS} = {size}, but the other SuperNodes say {agreed}",
                )
        self._warn_of_shared_partitions(clients, [proxy.cid for proxy in unknown])

    def _warn_of_shared_partitions(
        self, clients: dict[str, ClientProxy], new: list[str]
    ) -> None:
        """Warn of each node in `new` that names a partition another of `clients` does.

        Both take part: each trains on that partition and weighs in FedAvg, and
        history.json names the later one by its node (docs/reliability.md).
        """
        holders: dict[int, list[str]] = {}
        for cid in clients:
            if cid in self._identities:
                holders.setdefault(self._identities[cid][0], []).append(cid)
        for cid in new:
            if cid not in self._identities:
                continue
            partition_id = self._identities[cid][0]
            others = [other for other in holders[partition_id] if other != cid]
            if others:
                log(
                    WARNING,
                    "node %s says %s = %s, as node(s) %s do: each takes part, and "
                    "that partition counts once per node (check their node config).",
                    cid,
                    PARTITION_ID,
                    partition_id,
                    ", ".join(others),
                )

    def _leave_out(self, cid: str, reason: str) -> None:
        """Never sample node `cid`, and say why."""
        self.unidentified[cid] = f"node {cid} left out: {reason}"
        log(WARNING, "%s", self.unidentified[cid])


def _identity(properties: dict) -> tuple[int, int] | str:
    """Return (partition-id, num-partitions) from a node's properties, or why not."""
    partition_id = properties.get(PARTITION_ID)
    num_partitions = properties.get(NUM_PARTITIONS)
    for key, value in ((PARTITION_ID, partition_id), (NUM_PARTITIONS, num_partitions)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} = {shown(value)}, expected an integer"
    if not 0 <= partition_id < num_partitions:
        return (
            f"{PARTITION_ID} = {partition_id} is outside [0, {NUM_PARTITIONS} = "
            f"{num_partitions})"
        )
    return partition_id, num_partitions
