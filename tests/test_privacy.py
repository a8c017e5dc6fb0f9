"""Secure aggregation and differential privacy: clipping, noise, accounting, budget."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    APP_DIR,
    default_run_config,
    first_round_updates,
    in_process,
    make_context,
)
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    Context,
    FitIns,
    FitRes,
    GetPropertiesRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity

from flower_tutorial.client_app import app as client_app
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import PrivacySettings, RunSettings
from flower_tutorial.privacy import (
    FixedClipping,
    PrivacyLedger,
    noise_multiplier,
    privacy_mod,
    secure_fit_workflow,
    with_central_dp,
)
from flower_tutorial.recording import RunRecorder
from flower_tutorial.strategy import CheckedStrategy
from flower_tutorial.task import Net, get_parameters

OK = Status(Code.OK, "")


def _fit_message(parameters: list[np.ndarray], config: dict) -> Message:
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(parameters), config), keep_input=True
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch) -> None:
    """Who this process is, as Flower's runtime tells a ClientApp process."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _client_update(run_config: dict, clipping_norm: float | None) -> float:
    """Train partition 1 through the ClientApp, mods included; the update's norm."""
    initial = get_parameters(Net())
    config = {"server-round": 1}
    if clipping_norm is not None:
        config[KEY_CLIPPING_NORM] = clipping_norm  # what Flower's DP wrapper sends
    context = make_context(run_config, {"partition-id": 1, "num-partitions": 4})
    reply = client_app(_fit_message(initial, config), context)
    assert not reply.has_error(), reply.error
    sent = parameters_to_ndarrays(
        compat.recorddict_to_fitres(reply.content, False).parameters
    )
    return math.sqrt(
        sum(float(((a - b) ** 2).sum()) for a, b in zip(sent, initial, strict=True))
    )


def test_client_side_clipping_bounds_every_update(run_config):
    free = _client_update(run_config, None)
    clipped = _client_update(run_config | {"dp": "central-fixed"}, 0.05)
    assert free > 0.05  # the bound is tight enough to matter
    assert clipped <= 0.05 * (1 + 1e-5)
    assert clipped == pytest.approx(0.05, rel=1e-3)  # clipped, not zeroed


def _num_examples(reply: Message) -> int:
    return compat.recorddict_to_fitres(reply.content, False).num_examples


def _trains_on_100(msg: Message, context: Context) -> Message:
    """A client holding 100 examples, which moves every weight by 1."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    moved = [a + 1 for a in parameters_to_ndarrays(ins.parameters)]
    res = FitRes(OK, ndarrays_to_parameters(moved), 100, {"train_loss": 1.0})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


@pytest.mark.parametrize(
    ("secure_aggregation", "dp", "weight"),
    [
        (True, "central-fixed", 1),
        (True, "central-adaptive", 1),
        (True, "local", 100),  # each update noised on its own: FedAvg's weights
        (True, "none", 100),
        (False, "central-fixed", 100),  # the server weighs each update once
    ],
)
def test_secaggplus_weighs_every_clipped_update_once(
    monkeypatch, secure_aggregation, dp, weight
):
    # SecAgg+ scales each update by its count of examples on the client; under
    # central DP the noise is made for a mean of clipped updates of equal weight.
    seen = []

    def secaggplus_mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        seen.append(_num_examples(reply))  # what the real one would weigh by
        return reply

    monkeypatch.setattr("flower_tutorial.privacy.secaggplus_mod", secaggplus_mod)
    context = make_context(
        default_run_config() | {"secure-aggregation": secure_aggregation, "dp": dp}
    )
    config = {"server-round": 1, KEY_CLIPPING_NORM: 10.0}
    msg = _fit_message([np.zeros(3, np.float32)], config)
    reply = privacy_mod(msg, context, _trains_on_100)
    assert _num_examples(reply) == weight
    assert seen == ([weight] if secure_aggregation else [])


# A ClientApp process as a deployment starts it for SecAgg+'s first stage: it loads
# the app and answers with its public keys, without PyTorch. Then a message that
# needs the model (which partition the node holds) loads it.
KEY_EXCHANGE_THEN_THE_MODEL = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import GetPropertiesIns
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS, Key, Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity
from flower_tutorial.client_app import app

for name in ("_task_id", "_run_id", "_node_id"):
    setattr(TaskIdentity, name, 1)
setup = {
    Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3,
    Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22,
    Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 1000.0,
}
content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)})
msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
node_config = {"partition-id": 2, "num-partitions": 3}
context = Context(1, 1, node_config, RecordDict(), json.loads(sys.argv[1]))
reply = app(msg, context)
assert not reply.has_error(), reply.error
print(sorted(reply.content.config_records[RECORD_KEY_CONFIGS]))
print("torch imported:", "torch" in sys.modules)
content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
msg = Message(content, dst_node_id=1, message_type=MessageTypeLegacy.GET_PROPERTIES)
reply = app(msg, context)
assert not reply.has_error(), reply.error
print(compat.recorddict_to_getpropertiesres(reply.content).properties)
print("torch imported:", "torch" in sys.modules)
"""


def test_secaggplus_key_exchange_loads_pytorch_only_when_the_model_is_needed(
    run_config,
):
    run_config = run_config | {"secure-aggregation": True}
    done = subprocess.run(
        [sys.executable, "-c", KEY_EXCHANGE_THEN_THE_MODEL, json.dumps(run_config)],
        capture_output=True,
        text=True,
        cwd=APP_DIR,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "['pk1', 'pk2']",
        "torch imported: False",
        "{'partition-id': 2, 'num-partitions': 3}",
        "torch imported: True",
    ]


@pytest.mark.parametrize(("dp", "max_weight"), [("none", 240), ("central-fixed", 1)])
def test_secaggplus_scales_no_update_past_its_own(cifar_dir, dp, max_weight):
    # The train split's size (240 synthetic images) bounds a partition's count;
    # under central DP each client counts as one, kept unscaled.
    settings = RunSettings.from_run_config(
        default_run_config()
        | {"dataset": str(cifar_dir), "secure-aggregation": True, "dp": dp}
    )
    workflow = secure_fit_workflow(settings.privacy, settings.data)
    assert workflow.max_weight == max_weight


class _Proxy:
    def __init__(self, pid: int) -> None:
        self.cid = f"node-{pid}"
        self.pid = pid

    def get_properties(self, ins, timeout, group_id) -> GetPropertiesRes:
        return GetPropertiesRes(OK, {"partition-id": self.pid, "num-partitions": 10})


def _checked(tmp_path, inner, num_nodes: int, **kwargs) -> CheckedStrategy:
    settings = RunSettings.from_run_config(default_run_config())
    manager = SeededClientManager(timeout=5.0, seed=0)
    for pid in range(num_nodes):
        manager.register(_Proxy(pid))
    recorder = RunRecorder(tmp_path, {}, settings.data, 3, False)
    return CheckedStrategy(inner, client_manager=manager, recorder=recorder, **kwargs)


def _updates(strategy: CheckedStrategy, models: list[list[np.ndarray]]) -> list:
    """(proxy, FitRes) of node i for models[i]."""
    proxies = strategy.client_manager.all()
    metrics = {"train_loss": 1.0}
    return [
        (proxies[f"node-{i}"], FitRes(OK, ndarrays_to_parameters(m), 7, metrics))
        for i, m in enumerate(models)
    ]


def test_central_noise_has_the_advertised_deviation(tmp_path):
    # Updates of zero: what comes back is the noise alone, N(0, z * C / m) per
    # coordinate, m the clients of the round. 60,000 draws fix its deviation to
    # within 1 % (standard error 0.3 %).
    z, clip, m, size = 0.7, 2.0, 4, 20_000
    np.random.seed(0)
    dp = FixedClipping(FedAvg(), z, clip, 1)
    strategy = _checked(tmp_path, dp, m, central_dp=True)
    zeros = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
    draws = []
    for server_round in range(1, 4):
        instructions = strategy.configure_fit(
            server_round, zeros, strategy.client_manager
        )
        assert len(instructions) == dp.num_sampled_clients == m
        updates = _updates(strategy, [[np.zeros(size, np.float32)]] * m)
        params, _ = strategy.aggregate_fit(server_round, updates, [])
        draws.append(parameters_to_ndarrays(params)[0])
    noise = np.concatenate(draws)
    assert abs(noise.mean()) < 4 * z * clip / m / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(z * clip / m, rel=0.01)


def test_adaptive_clipping_lowers_a_norm_that_clips_nothing(tmp_path):
    # Every client reports its update within the norm: the noised share of
    # unclipped updates (about 1) is above the target quantile, so C shrinks.
    settings = RunSettings.from_run_config(
        default_run_config() | {"dp": "central-adaptive", "dp-noise-multiplier": 0.5}
    )
    dp = with_central_dp(FedAvg(), settings.privacy, settings.min_fit_clients)
    strategy = _checked(tmp_path, dp, 10, central_dp=True)
    zeros = ndarrays_to_parameters([np.zeros(10, dtype=np.float32)])
    np.random.seed(0)
    assert len(strategy.configure_fit(1, zeros, strategy.client_manager)) == 10
    updates = _updates(strategy, [[np.zeros(10, np.float32)]] * 10)
    for _, res in updates:
        res.metrics[KEY_NORM_BIT] = True
    assert strategy.aggregate_fit(1, updates, [])[0] is not None
    assert dp.clipping_norm < settings.privacy.dp_clipping_norm


def test_epsilon_grows_and_is_dp_accountings_own(tmp_path):
    settings = RunSettings.from_run_config(
        default_run_config() | {"dp": "central-fixed"}
    )
    ledger = PrivacyLedger(settings.privacy)
    direct = RdpAccountant()
    spent = []
    for _ in range(5):
        spent.append(ledger.spend())
        direct.compose(dp_event.GaussianDpEvent(settings.privacy.dp_noise_multiplier))
        assert spent[-1] == pytest.approx(direct.get_epsilon(settings.privacy.dp_delta))
    assert all(b > a for a, b in zip(spent, spent[1:], strict=False))


def test_local_dp_is_counted_with_the_local_mods_noise():
    privacy = PrivacySettings.from_run_config(
        default_run_config()
        | {"dp": "local", "dp-local-epsilon": 2.0, "dp-delta": 1e-4}
    )
    # LocalDpMod's deviation over the sensitivity: sqrt(2 ln(1.25 / delta)) / epsilon.
    assert noise_multiplier(privacy) == pytest.approx(
        math.sqrt(2 * math.log(12500)) / 2
    )


def test_the_budget_ends_the_run_before_a_round_would_pass_it(tmp_path):
    privacy = RunSettings.from_run_config(
        default_run_config() | {"dp": "local"}
    ).privacy
    # The budget: more than two rounds spend, less than three.
    probe = PrivacyLedger(privacy)
    spent = [probe.spend() for _ in range(3)]
    ledger = PrivacyLedger(privacy)
    ledger.max_epsilon = (spent[1] + spent[2]) / 2
    strategy = _checked(tmp_path, FedAvg(), 3, privacy=ledger)
    model = ndarrays_to_parameters(get_parameters(Net()))
    for server_round in (1, 2):
        assert strategy.configure_fit(server_round, model, strategy.client_manager)
        updates = _updates(strategy, [get_parameters(Net())] * 3)
        assert strategy.aggregate_fit(server_round, updates, [])[0] is not None
        assert (
            strategy.recorder.rounds[server_round]["epsilon"] == spent[server_round - 1]
        )
    assert strategy.configure_fit(3, model, strategy.client_manager) == []
    assert strategy.last_round == 2 and ledger.epsilon == spent[1]
    assert strategy.recorder.finished
    assert (tmp_path / "final_model.pt").exists()
    assert "after round 2" in strategy.recorder.stopped_early
    assert strategy.evaluate(3, model) is None
    assert strategy.configure_evaluate(3, model, strategy.client_manager) == []


SPY = """
import numpy as np
from flwr.common import parameters_to_ndarrays
from flwr.server.strategy import FedAvg
from flower_tutorial import server_app


class SpyFedAvg(FedAvg):
    # What the server-side strategy receives: every result's parameters.
    def aggregate_fit(self, server_round, results, failures):
        rows = [
            np.concatenate([a.ravel() for a in parameters_to_ndarrays(r.parameters)])
            for _, r in results
        ]
        np.save(OUT, np.stack(rows))
        return super().aggregate_fit(server_round, results, failures)


server_app.flower_strategy = lambda chosen, learning_rate, **common: SpyFedAvg(**common)
"""


def test_secure_aggregation_gives_fedavg_without_showing_an_update(
    run_python, cifar_dir, tmp_path
):
    nodes = 3
    run_config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": 1,
        "min-fit-clients": nodes,
        "min-evaluate-clients": 2,
        "min-available-clients": nodes,
        "batch-size": 16,
        "secure-aggregation": True,
        "output-dir": str(tmp_path / "out"),
    }
    seen = tmp_path / "seen.npy"
    code = f"""{in_process()}OUT = {str(seen)!r}
{SPY}
from flower_tutorial.simulation import run_tutorial_simulation
run_tutorial_simulation(num_supernodes={nodes}, run_config={run_config!r})
"""
    exit_code, output = run_python(code, timeout=300)
    assert exit_code == 0, output[-4000:]
    received = np.load(seen)
    assert len(received) == nodes
    assert (received == received[0]).all()  # one aggregate, handed over per client
    updates = _trained(run_config, nodes)
    flat = [np.concatenate([a.ravel() for a in u]) for u, _ in updates]
    total = sum(n for _, n in updates)
    fedavg = sum(f * n for f, (_, n) in zip(flat, updates, strict=True)) / total
    # SecAgg+ quantizes each weighted update to integers: stochastic rounding
    # (< 1 level, 2r / Q wide) and the weights' own rounding (q_i = round(n_i / M
    # * Q)) err by at most (2r + max|w|) * m / sum(q_i) on the mean; float32 adds
    # a few ulp.
    r, quantization = 8.0, 4194304
    max_weight = 240  # the synthetic train split
    q_total = sum(round(n / max_weight * quantization) for _, n in updates)
    bound = (2 * r + np.abs(fedavg).max()) * nodes / q_total + 1e-6
    assert np.abs(received[0] - fedavg).max() <= bound
    for update in flat:  # ...and it is none of the updates themselves
        assert np.abs(received[0] - update).max() > 100 * bound


def _trained(run_config: dict, nodes: int) -> list[tuple[list[np.ndarray], int]]:
    """Each node's round-1 update, trained here as its client would."""
    return first_round_updates(run_config, range(nodes), nodes)
