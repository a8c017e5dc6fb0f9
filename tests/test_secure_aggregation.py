"""SecAgg+ as the app runs it: masks, the clients' refusals, and what a round keeps.

The protocol's real messages between the app's client mods and Flower's workflow
(tests/secagg_protocol.py), with the app's `CheckedStrategy` as the server's
strategy where a round's outcome matters.
"""

import importlib
import re

import numpy as np
import pytest
from conftest import default_run_config
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from secagg_protocol import (
    ask_for_shares,
    federation,
    run_until_masked,
    trains_to,
    update_of,
)

from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import RunSettings
from flower_tutorial.recording import RunRecorder
from flower_tutorial.secure_aggregation import secure_fit_workflow, secure_masks
from flower_tutorial.strategy import CheckedStrategy

NUM_NODES = 4
pytestmark = pytest.mark.usefixtures("task_identity")
FLOWERS_MASKS = importlib.import_module(
    "flwr.common.secure_aggregation.secaggplus_utils"
).pseudo_rand_gen


def test_masks_depend_on_every_bit_of_the_seed():
    # Flower's generator XORs the seed's 4-byte words into one: seeds whose words
    # are swapped give the same masks, so there are at most 2**32 of them.
    seed = bytes(range(32))
    swapped = seed[4:8] + seed[:4] + seed[8:]
    shapes = [(3,), (2, 5)]
    flowers = [FLOWERS_MASKS(s, 2**32, shapes) for s in (seed, swapped)]
    assert all(np.array_equal(a, b) for a, b in zip(*flowers, strict=True))
    ours = [secure_masks(s, 2**32, shapes) for s in (seed, swapped)]
    assert not any(np.array_equal(a, b) for a, b in zip(*ours, strict=True))
    # Deterministic (client and server draw the same), in shape, below the range.
    again = secure_masks(seed, 2**32, shapes)
    assert all(np.array_equal(a, b) for a, b in zip(ours[0], again, strict=True))
    assert [a.shape for a in again] == shapes
    assert all(a.dtype == np.int64 for a in again)
    small = secure_masks(seed, 2**8, [(10_000,)])[0]
    assert small.min() >= 0 and small.max() <= 255
    assert abs(small.mean() - 127.5) < 2  # uniform: mean 127.5, std err 0.74
    assert secure_masks(seed, 2**32, [()])[0].shape == ()


def _checked_run(cifar_dir, tmp_path, **overrides):
    """A SecAgg+ round with the app's strategy: (grid, context, strategy, workflow)."""
    run_config = default_run_config() | {
        "dataset": str(cifar_dir),
        "secure-aggregation": True,
        "min-fit-clients": NUM_NODES,
        "min-available-clients": NUM_NODES,
        **overrides,
    }
    settings = RunSettings.from_run_config(run_config)
    manager = SeededClientManager(timeout=5.0, seed=0)
    recorder = RunRecorder(tmp_path, {}, settings.data, 1, False)
    inner = FedAvg(min_fit_clients=NUM_NODES, min_available_clients=NUM_NODES)
    strategy = CheckedStrategy(
        inner, client_manager=manager, recorder=recorder, privacy=settings.privacy
    )
    grid, context = federation(run_config, NUM_NODES, strategy, manager)
    return grid, context, strategy, secure_fit_workflow(settings.privacy, settings.data)


def _model(context) -> list[np.ndarray]:
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, True))


def _assert_unchanged(context, before: list[np.ndarray]) -> None:
    """The round left the global model as it was, to the bit."""
    for got, want in zip(_model(context), before, strict=True):
        np.testing.assert_array_equal(got, want)


def _nan_for(node_id: int):
    """A training that diverges on `node_id`: NaN weights, NaN loss."""

    def arrays(nid: int) -> list[np.ndarray]:
        if nid != node_id:
            return update_of(nid)
        return [np.full_like(a, np.nan) for a in update_of(nid)]

    return arrays


def _mean_of(nodes) -> list[np.ndarray]:
    updates = [update_of(nid) for nid in nodes]
    return [np.mean(arrays, axis=0) for arrays in zip(*updates, strict=True)]


def _assert_secure_mean(context, nodes) -> None:
    """The model is the mean of `nodes`' updates, up to SecAgg+'s quantization.

    Stochastic rounding (< 1 level, 2r / Q wide) and the weights' own rounding
    (q_i = round(n_i / M * Q)) err by at most (2r + max|w|) * m / sum(q_i).
    """
    r, levels, max_weight, examples = 8.0, 2**22, 240, 10  # the synthetic split
    q_total = len(nodes) * round(examples / max_weight * levels)
    bound = (2 * r + 1) * len(nodes) / q_total
    for got, want in zip(_model(context), _mean_of(nodes), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=bound)


def test_a_client_whose_training_diverged_refuses_and_the_round_goes_on(
    cifar_dir, tmp_path
):
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.trainers[2] = trains_to(_nan_for(2))
    workflow(grid, context)
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_clients"] == NUM_NODES - 1
    (reason,) = round_1["fit_failures"]  # once, named by partition and stage
    assert reason.startswith(
        "partition 1, SecAgg+ stage collect_masked_vectors: ValueError: refused to "
        "submit its update: array 0 holds NaN"
    )
    assert "fit_voided" not in round_1
    _assert_secure_mean(context, [1, 3, 4])


def test_a_client_beyond_the_clipping_range_refuses(cifar_dir, tmp_path):
    # SecAgg+ would clip client 4's weights of up to 10 to 8, without a word.
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.trainers[4] = trains_to(lambda nid: [10 * a for a in update_of(nid)])
    workflow(grid, context)
    (reason,) = strategy.recorder.rounds[1]["fit_failures"]
    assert reason.startswith("partition 3, SecAgg+ stage collect_masked_vectors:")
    assert "beyond secagg-clipping-range = 8, where secure aggregation" in reason
    _assert_secure_mean(context, [1, 2, 3])


def test_a_nan_that_reaches_the_sum_leaves_the_model_and_voids_the_round(
    cifar_dir, tmp_path
):
    # A client of another build submits NaN: Flower quantizes it to -2**31,
    # and the unmasked sum is finite and wrong (about 1e4 a weight). No report
    # says so; the sum is out of SecAgg+'s range, and the round changes nothing.
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.trainers[2] = trains_to(_nan_for(2), train_loss=0.5)
    grid.unguarded = {2}
    before = _model(context)
    workflow(grid, context)
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_voided"].startswith(
        "the secure aggregate is unsound: array 0 holds"
    )
    assert "beyond secagg-clipping-range = 8" in round_1["fit_voided"]
    _assert_unchanged(context, before)


def test_a_report_refused_after_the_sum_voids_the_round(cifar_dir, tmp_path):
    # Client 3's update is sound, its training loss NaN: its report is refused,
    # but SecAgg+ has already summed its update, so the round changes nothing.
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.trainers[3] = trains_to(update_of, train_loss=float("nan"))
    before = _model(context)
    workflow(grid, context)
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_failures"] == [
        "partition 2: metric 'train_loss' = nan, expected a finite number >= 0"
    ]
    assert round_1["fit_voided"] == (
        "the secure sum includes 1 update(s) whose report was refused (the first: "
        "partition 2: metric 'train_loss' = nan, expected a finite number >= 0)"
    )
    _assert_unchanged(context, before)


def test_a_sound_round_gives_the_mean(cifar_dir, tmp_path):
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    workflow(grid, context)
    assert strategy.recorder.rounds[1]["fit_clients"] == NUM_NODES
    _assert_secure_mean(context, [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("active", "dropped", "why"),
    [
        ([1, 2, 3], [2], r"calls node\(s\) \[2\] both active and dropped out"),
        ([2, 3, 4], [1], "calls this node, which is answering, dropped out"),
    ],
)
def test_a_client_refuses_an_unmasking_request_no_honest_server_sends(
    cifar_dir, active, dropped, why
):
    run_config = default_run_config() | {
        "dataset": str(cifar_dir),
        "secure-aggregation": True,
    }
    settings = RunSettings.from_run_config(run_config)
    grid, context = federation(run_config, NUM_NODES)
    run_until_masked(
        secure_fit_workflow(settings.privacy, settings.data), grid, context
    )
    assert ask_for_shares(grid, {1: (active, dropped)}) == {}
    msg, reply = grid.exchanges[-1]
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    assert configs[Key.STAGE] == Stage.UNMASK
    assert reply.has_error()
    assert re.search(why, reply.error.reason)


def test_a_client_that_fails_at_unmasking_is_in_the_sum_and_said_so(
    cifar_dir, tmp_path
):
    # Client 2 sends its masked update, then crashes before it hands out its
    # shares: the others' shares unmask the sum, which holds its update.
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.crashes[2] = Stage.UNMASK
    workflow(grid, context)
    round_1 = strategy.recorder.rounds[1]
    assert (round_1["fit_clients"], round_1["fit_failures"]) == (NUM_NODES, [])
    (reason,) = round_1["fit_unmasking_failures"]
    assert reason == ("partition 1, SecAgg+ stage unmask: RuntimeError: node 2 crashed")
    _assert_secure_mean(context, [1, 2, 3, 4])


def test_a_client_silent_in_a_stage_is_a_failure_of_its_own(cifar_dir, tmp_path):
    # Client 4's masked update never comes: Flower's workflow says nothing of
    # it, and the round's record does.
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.late = {4}
    workflow(grid, context)
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_clients"] == NUM_NODES - 1
    assert round_1["fit_failures"] == [
        "partition 3, SecAgg+ stage collect_masked_vectors: no reply within "
        "round-timeout (SecAgg+ stage collect_masked_vectors)"
    ]
    _assert_secure_mean(context, [1, 2, 3])


def test_a_round_with_too_few_clients_left_is_voided_and_the_run_goes_on(
    cifar_dir, tmp_path
):
    # Threshold 3 of 4 (0.7): two crashes leave two, too few to unmask.
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    grid.crashes = {1: Stage.SHARE_KEYS, 3: Stage.SHARE_KEYS}
    before = _model(context)
    workflow(grid, context)
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_clients"] == 0
    assert round_1["fit_failures"] == [
        "partition 0, SecAgg+ stage share_keys: RuntimeError: node 1 crashed",
        "partition 2, SecAgg+ stage share_keys: RuntimeError: node 3 crashed",
    ]
    assert round_1["fit_voided"].startswith(
        "secure aggregation halted before the sum was unmasked: 2 of the 4 "
        "clients asked failed"
    )
    _assert_unchanged(context, before)


def test_a_round_in_which_every_client_refused_ends_the_run(cifar_dir, tmp_path):
    grid, context, strategy, workflow = _checked_run(cifar_dir, tmp_path)
    for nid in range(1, NUM_NODES + 1):
        grid.trainers[nid] = trains_to(lambda n: [a * 100 for a in update_of(n)])
    with pytest.raises(RuntimeError) as ended:
        workflow(grid, context)
    assert str(ended.value).startswith(
        "All 4 clients failed in round 1 (fit); the first said: partition 0, "
        "SecAgg+ stage collect_masked_vectors: ValueError: refused to submit its "
        "update: array 0 holds"
    )
