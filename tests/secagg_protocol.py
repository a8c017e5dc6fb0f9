"""SecAgg+ message by message in this process, and a server that tries to cheat.

The app's client side (`privacy_mod`, with Flower's `secaggplus_mod` inside) and
Flower's server workflow exchange the protocol's real messages through
`RecordingGrid`, which keeps every message and reply: all that a curious server
holds. Each client "trains" to an update the test chose, so that what an attacker
recovers can be compared with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    GetPropertiesRes,
    Status,
    bytes_to_ndarray,
    ndarrays_to_parameters,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation import secaggplus_workflow
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
)

from flower_tutorial.privacy import privacy_mod

Arrays = list[np.ndarray]


class _Node:
    """What Flower's workflow and the app's client manager need of a client proxy."""

    def __init__(self, node_id: int, num_nodes: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)
        self._identity = {"partition-id": node_id - 1, "num-partitions": num_nodes}

    def get_properties(self, ins: Any, timeout: Any, group_id: Any) -> GetPropertiesRes:
        """Say which partition this node holds, as the app's clients do."""
        return GetPropertiesRes(Status(Code.OK, ""), dict(self._identity))


def update_of(node_id: int) -> Arrays:
    """The update client `node_id` sends: small arrays, distinct per client."""
    rng = np.random.default_rng(node_id)
    return [
        rng.uniform(-1, 1, size=(3,)).astype(np.float32),
        rng.uniform(-1, 1, size=(2, 4)).astype(np.float32),
    ]


def trains_to(
    arrays: Callable[[int], Arrays], train_loss: float = 1.0
) -> Callable[[Message, Context], Message]:
    """A client's training that returns `arrays(its node)`, for 10 examples."""

    def train(msg: Message, context: Context) -> Message:
        node_id = int(context.node_config["partition-id"]) + 1
        res = FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters(arrays(node_id)),
            10,
            {"train_loss": train_loss},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return train


@dataclass
class RecordingGrid:
    """Delivers each message to its client at once and keeps every exchange.

    `late` names clients whose stage-2 reply (the masked update) reaches the
    server only after the workflow stopped waiting: the workflow does not get it,
    but the server has it. `trainers` replace a client's training (by default
    `update_of` its node), and `unguarded` clients run Flower's `secaggplus_mod`
    alone, as a client of another build might, without the app's mods.
    `crashes` makes a client fail at a stage.
    """

    contexts: dict[int, Context]
    late: set[int] = field(default_factory=set)
    trainers: dict[int, Callable[[Message, Context], Message]] = field(
        default_factory=dict
    )
    unguarded: set[int] = field(default_factory=set)
    crashes: dict[int, str] = field(default_factory=dict)  # node -> at which stage
    exchanges: list[tuple[Message, Message]] = field(default_factory=list)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Hand each message to its client's mods; return the replies in time."""
        replies = []
        for msg in messages:
            reply = self.ask(msg)
            stage = _stage(msg)
            if not (stage == Stage.COLLECT_MASKED_VECTORS and _dst(msg) in self.late):
                replies.append(reply)
        return replies

    def ask(self, msg: Message) -> Message:
        """One client's reply to `msg` (an error reply if its mods raise)."""
        node_id = _dst(msg)
        context = self.contexts[node_id]
        train = self.trainers.get(node_id, trains_to(update_of))
        mods = secaggplus_mod if node_id in self.unguarded else privacy_mod
        try:
            if self.crashes.get(node_id) == _stage(msg):
                raise RuntimeError(f"node {node_id} crashed")
            # A copy, as a message crosses the network: the mods change what they get.
            reply = mods(copy.deepcopy(msg), context, train)
        except Exception as ex:  # as the ClientApp turns it into an error reply
            reply = Message(
                Error(code=0, reason=f"{type(ex).__name__}: {ex}"), reply_to=msg
            )
        self.exchanges.append((msg, reply))
        return reply


def _dst(msg: Message) -> int:
    return msg.metadata.dst_node_id


def _stage(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def federation(
    run_config: dict[str, Any],
    num_nodes: int,
    strategy: Strategy | None = None,
    manager: ClientManager | None = None,
) -> tuple[RecordingGrid, LegacyContext]:
    """Clients 1..num_nodes with the app's client mods, and the server's context.

    The server's strategy and client manager are FedAvg's and Flower's simple
    one, or those given (the app's).
    """
    contexts = {
        nid: Context(
            run_id=1,
            node_id=nid,
            node_config={"partition-id": nid - 1, "num-partitions": num_nodes},
            state=RecordDict(),
            run_config=run_config,
        )
        for nid in range(1, num_nodes + 1)
    }
    if manager is None:  # not `or`: an empty client manager is falsy
        manager = SimpleClientManager()
    for nid in contexts:
        manager.register(_Node(nid, num_nodes))  # type: ignore[arg-type]
    strategy = strategy or FedAvg(
        min_fit_clients=num_nodes, min_available_clients=num_nodes
    )
    context = LegacyContext(
        Context(0, 0, {}, RecordDict(), run_config),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1}
    )
    zeros = [np.zeros_like(a) for a in update_of(1)]
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(zeros), keep_input=True
    )
    return RecordingGrid(contexts), context


# A stage-3 plan: for each client asked, the nodes it is told are active and dead.
Plan = dict[int, tuple[list[int], list[int]]]


def run_until_masked(
    workflow: Any, grid: RecordingGrid, context: LegacyContext
) -> secaggplus_workflow.WorkflowState:
    """Stages 0 to 2 of the protocol, as Flower's workflow runs them."""
    state = secaggplus_workflow.WorkflowState()
    for stage in (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
    ):
        assert stage(grid, context, state), "the honest stages failed"
    return state


def ask_for_shares(
    grid: RecordingGrid, plan: Plan
) -> dict[int, dict[str, list[bytes]]]:
    """Send the stage-3 requests of `plan`; return the shares that came back.

    {owner node: {"rd_seed": [...], "sk1": [...]}}: a share is of the owner's
    private mask seed where the asked client was told the owner is active, and of
    its first secret key where it was told the owner is dead.
    """
    shares: dict[int, dict[str, list[bytes]]] = {}
    for nid, (active, dead) in plan.items():
        cfg = ConfigRecord(
            {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: active,
                Key.DEAD_NODE_ID_LIST: dead,
            }
        )
        msg = Message(
            RecordDict({RECORD_KEY_CONFIGS: cfg}),
            dst_node_id=nid,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        reply = grid.ask(msg)
        if reply.has_error():
            continue
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        owners = list(record[Key.NODE_ID_LIST])
        for position, (owner, share) in enumerate(
            zip(owners, record[Key.SHARE_LIST], strict=True)
        ):
            kind = "rd_seed" if position < len(active) else "sk1"
            shares.setdefault(owner, {"rd_seed": [], "sk1": []})[kind].append(share)
    return shares


def masked_update(grid: RecordingGrid, node_id: int) -> Arrays:
    """The masked update that `node_id` sent in stage 2, from the server's records."""
    for msg, reply in grid.exchanges:
        if _dst(msg) == node_id and _stage(msg) == Stage.COLLECT_MASKED_VECTORS:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            return [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
    raise LookupError(f"node {node_id} sent no masked update")


def shares_revealed(grid: RecordingGrid) -> dict[int, dict[str, list[bytes]]]:
    """The stage-3 shares in the server's records, by owner and kind."""
    shares: dict[int, dict[str, list[bytes]]] = {}
    for msg, reply in grid.exchanges:
        if _stage(msg) != Stage.UNMASK or reply.has_error():
            continue
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        num_active = len(configs[Key.ACTIVE_NODE_ID_LIST])
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        for position, (owner, share) in enumerate(
            zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True)
        ):
            kind = "rd_seed" if position < num_active else "sk1"
            shares.setdefault(owner, {"rd_seed": [], "sk1": []})[kind].append(share)
    return shares


MaskFn = Callable[[bytes, int, list[tuple[int, ...]]], Arrays]


def strip_pairwise_masks(
    state: secaggplus_workflow.WorkflowState,
    masked: Arrays,
    target: int,
    first_keys: dict[int, bytes],
    masks: MaskFn,
) -> Arrays | None:
    """Remove `target`'s pairwise masks, given first secret keys; None if short.

    A pairwise mask is known from either side's first secret key: the target's
    own, or each of its neighbours'.
    """
    shapes = get_parameters_shape(masked)
    left = masked
    for other in state.nid_to_neighbours[target] - {target}:
        if target in first_keys:
            key = generate_shared_key(
                bytes_to_private_key(first_keys[target]),
                bytes_to_public_key(state.nid_to_publickeys[other][0]),
            )
        elif other in first_keys:
            key = generate_shared_key(
                bytes_to_private_key(first_keys[other]),
                bytes_to_public_key(state.nid_to_publickeys[target][0]),
            )
        else:
            return None
        mask = masks(key, state.mod_range, shapes)
        # The client added the mask if its ID is the larger one, else subtracted it.
        signed = mask if target > other else [-m for m in mask]
        left = parameters_subtraction(left, signed)
    return parameters_mod(left, state.mod_range)


def as_update(state: secaggplus_workflow.WorkflowState, quantized: Arrays) -> Arrays:
    """The client's update from its quantized, weighted vector (no masks left)."""
    q_ratio, parameters = factor_extract(quantized)
    values = dequantize(parameters, state.clipping_range, state.quantization_range)
    return [v * state.quantization_range / q_ratio for v in values]


def revealed_secrets(
    shares: dict[int, dict[str, list[bytes]]], threshold: int
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The secrets that `shares` rebuild: private mask seeds, first secret keys.

    A secret needs `threshold` shares; {owner: secret} of each kind.
    """
    seeds, first_keys = {}, {}
    for owner, kinds in shares.items():
        if len(kinds["rd_seed"]) >= threshold:
            seeds[owner] = combine_shares(kinds["rd_seed"])
        if len(kinds["sk1"]) >= threshold:
            first_keys[owner] = combine_shares(kinds["sk1"])
    return seeds, first_keys


def plausible(state: secaggplus_workflow.WorkflowState, quantized: Arrays) -> bool:
    """Whether `quantized` looks like a client's unmasked vector, not masked noise.

    Its weight factor is at most the quantization range, and so is every value
    (each lies in [0, range] before weighting). A masked vector's entries are
    uniform below 2**32.
    """
    return all(int(a.max()) <= state.quantization_range for a in quantized)
