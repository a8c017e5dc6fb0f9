"""flower_tutorial: SecAgg+ as the app runs it: Flower's protocol, with three mends.

Flower's SecAgg+ (`secaggplus_mod` on the clients, `SecAggPlusWorkflow` on the
server) masks each client's update so that the server unmasks only their sum. Its
guarantee here rests on three things Flower does not do (docs/privacy.md names
each upstream defect):

- masks drawn from the whole seed (`secure_masks`): Flower's `pseudo_rand_gen`
  folds a 32-byte seed into 32 bits, and a late client's update then falls to
  2**32 guesses;
- clients that answer an unmasking request only as the protocol can ask it
  (`refuse_unmasking_a_live_client`): Flower's clients hand out both secrets of a
  client that a lying server calls active and dropped at once;
- clients that submit only what the protocol can sum
  (`refuse_an_unmaskable_update`): Flower quantizes NaN to -2**31, which unmasks
  to a finite, wrong sum.

Nothing here imports PyTorch: the ClientApp's key-exchange stages do without it.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from flower_tutorial.config import SECAGG_MODULUS, DataSettings, PrivacySettings

# The modules (not the mod and class of the same names their packages export)
# whose mask generator `use_secure_masks` replaces.
_CLIENT_PROTOCOL = importlib.import_module(
    "flwr.client.mod.secure_aggregation.secaggplus_mod"
)
_SERVER_PROTOCOL = importlib.import_module(
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
)
_NONCE = bytes(16)  # every key masks one vector: a fixed nonce repeats no stream


def secure_masks(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Return SecAgg+'s masks for `seed`: uniform integers in [0, num_range).

    The ChaCha20 key stream of SHA-256(seed), so every bit of the seed counts;
    `num_range` is SecAgg+'s modulus, a power of 2 up to 2**32. In place of
    Flower's `pseudo_rand_gen`, which XORs the seed's 4-byte words into one 32-bit
    seed of NumPy's Mersenne Twister.
    """
    sizes = [math.prod(shape) for shape in dimensions_list]
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(4 * sum(sizes))), dtype="<u4")
    values = words.astype(np.int64) & (num_range - 1)
    ends = np.cumsum(sizes)
    return [
        values[end - size : end].reshape(shape)
        for shape, size, end in zip(dimensions_list, sizes, ends, strict=True)
    ]


def use_secure_masks() -> None:
    """Make Flower's SecAgg+ mask with `secure_masks`, on clients and server alike.

    Both sides of the protocol must draw the same masks: the ClientApp calls this
    before `secaggplus_mod` runs, the ServerApp before its workflow does.
    """
    _CLIENT_PROTOCOL.pseudo_rand_gen = secure_masks
    _SERVER_PROTOCOL.pseudo_rand_gen = secure_masks


def refuse_unmasking_a_live_client(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Answer an unmasking request only if the protocol could have sent it.

    In stage 3 a client reveals, for each neighbour, the share of its private
    mask seed if the server says it is active, or of its first secret key if the
    server says it dropped out. Both shares of one client unmask its update. An
    honest server never names a client in both lists, and never asks a client
    that it calls dropped: this one is answering.
    """
    if msg.metadata.message_type == MessageType.TRAIN and (
        RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        if configs.get(Key.STAGE) == Stage.UNMASK:
            active = set(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
            dropped = set(configs.get(Key.DEAD_NODE_ID_LIST, []))
            if active & dropped:
                raise PermissionError(
                    "refused to unmask: the server calls node(s) "
                    f"{sorted(active & dropped)} both active and dropped out"
                )
            if msg.metadata.dst_node_id in dropped:
                raise PermissionError(
                    "refused to unmask: the server calls this node, which is "
                    "answering, dropped out"
                )
    return call_next(msg, context)


def refuse_an_unmaskable_update(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Fail instead of submitting an update that SecAgg+ would corrupt.

    SecAgg+ clips every weight to [-secagg-clipping-range, secagg-clipping-range]
    without a word, and turns NaN into -2**31: either would change the sum that
    the server unmasks, and no check of the server's can see which client did
    it. A client refusing drops out of the round, which SecAgg+ survives.
    """
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    limit = PrivacySettings.from_run_config(context.run_config).secagg_clipping_range
    for i, array in enumerate(parameters_to_ndarrays(res.parameters)):
        if not np.isfinite(array).all():
            raise ValueError(
                f"refused to submit its update: array {i} holds NaN or infinite "
                "values, which secure aggregation would turn into a wrong sum"
            )
        if array.size and np.abs(array).max() > limit:
            raise ValueError(
                f"refused to submit its update: array {i} holds "
                f"{float(np.abs(array).max()):g}, beyond secagg-clipping-range = "
                f"{limit:g}, where secure aggregation would clip it"
            )
    return reply


class SecAggClientError(Exception):
    """A client that failed in a stage of SecAgg+: which node, which stage, why."""

    def __init__(self, node_id: int, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.node_id = node_id
        self.stage = stage

    @property
    def summed(self) -> bool:
        """Whether its update is in the sum: it failed only at unmasking it."""
        return self.stage == Stage.UNMASK


class HaltedRounds(Protocol):
    """What records a round whose secure sum was never unmasked (the strategy)."""

    def record_halted_fit(
        self, server_round: int, failures: list[SecAggClientError]
    ) -> None:
        """Record the round's failures; the round changes nothing."""


class _FailureLog(list):
    """The workflow's list of failures: each client's once, named by node and stage.

    Flower appends a stage-2 error reply twice (its two loops over the replies
    each do), which makes one failure count as two and can hide a client that
    never replied; and a bare Exception says neither who nor when.
    """

    def __init__(self, origins: dict[int, tuple[int, str]]) -> None:
        super().__init__()
        self._origins = origins  # id(error) -> (node, stage), from the grid
        self._seen: set[int] = set()

    def append(self, failure: object) -> None:
        """Add Flower's Exception(error) once, as a SecAggClientError."""
        if isinstance(failure, SecAggClientError):
            super().append(failure)
            return
        error = failure.args[0] if isinstance(failure, BaseException) else failure
        if id(error) in self._seen:
            return
        self._seen.add(id(error))
        node_id, stage = self._origins[id(error)]
        super().append(
            SecAggClientError(node_id, stage, str(getattr(error, "reason", error)))
        )


class _WatchedGrid:
    """The grid the workflow sends through: notes each error reply and silence.

    An error reply's Error, by node and stage, for `_FailureLog`; a client that
    does not reply within round-timeout becomes a failure of its own, which
    Flower's workflow does not record.
    """

    def __init__(self, grid: Grid, origins: dict[int, tuple[int, str]]) -> None:
        self._grid = grid
        self.origins = origins
        self.failures: _FailureLog | None = None  # this round's, once it is set up

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped Grid's."""
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send as the Grid does; note who failed, at which stage."""
        messages = list(messages)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        if not messages:
            return replies
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        for reply in replies:
            if reply.has_error():
                self.origins[id(reply.error)] = (reply.metadata.src_node_id, stage)
        replied = {reply.metadata.src_node_id for reply in replies}
        for msg in messages:
            if msg.metadata.dst_node_id not in replied and self.failures is not None:
                self.failures.append(
                    SecAggClientError(
                        msg.metadata.dst_node_id,
                        stage,
                        f"no reply within round-timeout (SecAgg+ stage {stage})",
                    )
                )
        return replies


class SecureFitWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, every client's failure recorded once.

    Each failure is a `SecAggClientError`, named by its node and stage, silent
    clients included. A round that halts before its sum is unmasked (too few
    clients or shares left) is recorded with its failures through the strategy's
    `record_halted_fit`: Flower's workflow never tells the strategy about it.
    """

    def __call__(self, grid: Grid, context: Context) -> None:
        """Run one round of SecAgg+; record it if it halts."""
        self._grid = _WatchedGrid(grid, {})
        self._asked = False
        self._unmasked = False
        super().__call__(self._grid, context)
        if self._asked and not self._unmasked:
            cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
            strategy: HaltedRounds = context.strategy  # type: ignore[attr-defined]
            strategy.record_halted_fit(
                int(cfg[WorkflowKey.CURRENT_ROUND]), list(self._grid.failures or [])
            )

    def setup_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """Set the round up, its failures kept in a `_FailureLog`.

        (Not when a caller runs the stages on a grid of its own, not `__call__`.)
        """
        if isinstance(grid, _WatchedGrid):
            state.failures = grid.failures = _FailureLog(grid.origins)
        done = super().setup_stage(grid, context, state)
        self._asked = bool(state.sampled_node_ids)
        return done

    def unmask_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """Unmask the sum (and hand it to the strategy), noting that it did."""
        self._unmasked = super().unmask_stage(grid, context, state)
        return self._unmasked


def secure_fit_workflow(
    privacy: PrivacySettings, data: DataSettings
) -> SecureFitWorkflow:
    """Return SecAgg+'s fit workflow with the run's settings, masking securely.

    SecAgg+ scales each update by examples / max_weight before masking, and
    anything above 1 can overflow: max_weight is the size of the train split,
    which no partition exceeds. Under DP every client reports one example, and
    max_weight 1 leaves its update unscaled. The workflow's waits for replies end
    at round-timeout: the grid it is given ends them.
    """
    # Here, not at the top: data.py imports PyTorch, which the ClientApp's
    # mods, also defined here, do without (client_app.py says why).
    from flower_tutorial.data import train_split_size

    use_secure_masks()
    max_weight = 1 if privacy.dp != "none" else train_split_size(data)
    return SecureFitWorkflow(
        num_shares=privacy.secagg_num_shares,
        reconstruction_threshold=privacy.secagg_reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=privacy.secagg_clipping_range,
        quantization_range=privacy.secagg_quantization_range,
        modulus_range=SECAGG_MODULUS,
    )
