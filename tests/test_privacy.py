"""Secure aggregation and differential privacy: clipping, noise, accounting, budget."""

import json
import math
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest
from conftest import (
    APP_DIR,
    default_run_config,
    first_round_updates,
    history_of,
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
    EvaluateIns,
    FitIns,
    FitRes,
    GetPropertiesRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
)

from flower_tutorial.client_app import app as client_app
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import RunSettings
from flower_tutorial.differential_privacy import (
    FixedClipping,
    LocalRelease,
    PrivacyLedger,
    ServerNoise,
    local_noise_multiplier,
    with_central_dp,
)
from flower_tutorial.privacy import privacy_mod
from flower_tutorial.recording import RunRecorder
from flower_tutorial.secure_aggregation import secure_fit_workflow
from flower_tutorial.strategy import CheckedStrategy
from flower_tutorial.task import Net, get_parameters

OK = Status(Code.OK, "")
pytestmark = pytest.mark.usefixtures("task_identity")


def _fit_message(parameters: list[np.ndarray], config: dict) -> Message:
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(parameters), config), keep_input=True
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


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
        (True, "local", 1),  # a count says how large an organization is
        (True, "none", 100),
        (False, "central-fixed", 1),  # without SecAgg+ too
    ],
)
def test_secaggplus_weighs_every_clipped_update_once(
    monkeypatch, secure_aggregation, dp, weight
):
    # SecAgg+ scales each update by its count of examples on the client; under
    # central DP the noise is made for a mean of clipped updates of equal weight,
    # and under any DP the count would leave the client without noise.
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


@pytest.mark.parametrize(
    ("dp", "max_weight"), [("none", 240), ("central-fixed", 1), ("local", 1)]
)
def test_secaggplus_scales_no_update_past_its_own(cifar_dir, dp, max_weight):
    # The train split's size (240 synthetic images) bounds a partition's count;
    # under DP each client counts as one, kept unscaled.
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


def _privacy(**overrides) -> RunSettings:
    return RunSettings.from_run_config(default_run_config() | overrides)


def _checked(
    tmp_path, inner, num_nodes: int, num_rounds: int = 3, **kwargs
) -> CheckedStrategy:
    settings = RunSettings.from_run_config(default_run_config())
    manager = SeededClientManager(timeout=5.0, seed=0)
    for pid in range(num_nodes):
        manager.register(_Proxy(pid))
    recorder = RunRecorder(tmp_path, {}, settings.data, num_rounds, False)
    return CheckedStrategy(inner, client_manager=manager, recorder=recorder, **kwargs)


def _updates(
    strategy: CheckedStrategy, models: list[list[np.ndarray]], metrics: dict
) -> list:
    """(proxy, FitRes) of node i for models[i], each reporting `metrics`."""
    proxies = strategy.client_manager.all()
    return [
        (proxies[f"node-{i}"], FitRes(OK, ndarrays_to_parameters(m), 1, dict(metrics)))
        for i, m in enumerate(models)
    ]


def _central(tmp_path, dp: str, m: int, **overrides) -> CheckedStrategy:
    """The app's checks around its central-DP wrapper, for m clients a round."""
    settings = _privacy(dp=dp, **{"min-fit-clients": m, **overrides})
    noise = ServerNoise()
    inner = with_central_dp(FedAvg(), settings.privacy, m, noise)
    ledger = PrivacyLedger(settings.privacy, release=inner)
    return _checked(
        tmp_path, inner, m, 200, privacy=settings.privacy, ledger=ledger, noise=noise
    )


def _noise_of_a_round(strategy, server_round: int, size: int, bits: list) -> np.ndarray:
    """Run a round of zero updates: what comes back is the noise alone."""
    zeros = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
    instructions = strategy.configure_fit(server_round, zeros, strategy.client_manager)
    assert len(instructions) == len(bits)
    models = [[np.zeros(size, np.float32)]] * len(bits)
    updates = _updates(strategy, models, {})
    for (_, res), bit in zip(updates, bits, strict=True):
        if bit is not None:
            res.metrics[KEY_NORM_BIT] = bit
    params, _ = strategy.aggregate_fit(server_round, updates, [])
    return parameters_to_ndarrays(params)[0]


def test_central_noise_has_the_advertised_deviation(tmp_path):
    # N(0, z * C / m) per coordinate, m the clients of the round. 60,000 draws
    # fix its deviation to within 1 % (standard error 0.3 %).
    z, clip, m, size = 0.7, 2.0, 4, 20_000
    strategy = _central(
        tmp_path,
        "central-fixed",
        m,
        **{"dp-noise-multiplier": z, "dp-clipping-norm": clip},
    )
    noise = np.concatenate(
        [_noise_of_a_round(strategy, r, size, [None] * m) for r in range(1, 4)]
    )
    assert abs(noise.mean()) < 4 * z * clip / m / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(z * clip / m, rel=0.01)


def test_central_noise_is_the_servers_secret_and_only_its(tmp_path):
    # The same secret draws the same noise (a resumed run goes on as the
    # uninterrupted one), another secret other noise; NumPy's global generator,
    # which the app seeds from the public seed, has no say.
    def first_noise(secret: bytes, public_seed: int) -> np.ndarray:
        np.random.seed(public_seed)
        dp = FixedClipping(FedAvg(), 1.0, 1.0, 3, ServerNoise(secret))
        strategy = _checked(
            tmp_path, dp, 3, privacy=_privacy(dp="central-fixed").privacy
        )
        return _noise_of_a_round(strategy, 1, 1000, [None] * 3)

    secret = ServerNoise().secret
    assert len(secret) == 32 and secret != ServerNoise().secret
    same = first_noise(secret, 1)
    np.testing.assert_array_equal(same, first_noise(secret, 2))
    other = first_noise(ServerNoise().secret, 1)
    assert abs(np.corrcoef(same, other)[0, 1]) < 0.2


def _norms_and_bits(rng, clipping_norm: float, m: int) -> list[bool]:
    """m synthetic updates (lognormal norms, median 1); each one's norm bit.

    The bit as Flower's adaptiveclipping_mod sets it: whether the update was
    clipped.
    """
    bits = []
    for _ in range(m):
        update = rng.normal(size=20)
        update *= rng.lognormal(0.0, 0.5) / np.linalg.norm(update)
        arrays = [update.astype(np.float32)]
        bits.append(
            compute_adaptive_clip_model_update(
                arrays, [np.zeros(20, np.float32)], clipping_norm
            )
        )
    return bits


@pytest.mark.parametrize("target", [0.5, 0.8])
@pytest.mark.parametrize("start", [0.1, 10.0])
def test_adaptive_clipping_converges_to_the_target_quantile(tmp_path, target, start):
    # Updates whose norms are lognormal (median 1): C should settle where
    # `target` of them are left unclipped, at their `target`-quantile. Flower's
    # wrapper went from 0.5 to 0.0014 in 60 rounds, and from 2.0 to 761.
    m = 10
    strategy = _central(
        tmp_path,
        "central-adaptive",
        m,
        **{
            "dp-noise-multiplier": 0.4,
            "dp-clipping-norm": start,
            "dp-target-clipped-quantile": target,
        },
    )
    dp = strategy.strategy
    rng = np.random.default_rng(0)
    norms = []
    for server_round in range(1, 201):
        bits = _norms_and_bits(rng, dp.clipping_norm, m)
        _noise_of_a_round(strategy, server_round, 10, bits)
        norms.append(dp.clipping_norm)
    quantile = math.exp(0.5 * NormalDist().inv_cdf(target))
    settled = math.exp(np.mean(np.log(norms[100:])))
    assert settled == pytest.approx(quantile, rel=0.10)


def test_adaptive_noise_is_made_for_the_norm_the_clients_clipped_to(tmp_path):
    # Every client clips (bit true): C grows after each round. The noise of a
    # round is z_update * C / m with the C that round's clients were sent, and
    # epsilon is dp-accounting's for the multipliers that noise measures.
    m, size, delta = 10, 40_000, 1e-5
    strategy = _central(tmp_path, "central-adaptive", m, **{"dp-noise-multiplier": 0.4})
    dp = strategy.strategy
    direct = RdpAccountant()
    for server_round in range(1, 6):
        sent = dp.clipping_norm
        noise = _noise_of_a_round(strategy, server_round, size, [True] * m)
        assert strategy.recorder.rounds[server_round]["clipping_norm"] == sent
        assert dp.clipping_norm > sent  # it moved, after the noise was drawn
        measured = noise.std() / (sent / m)
        assert measured == pytest.approx(dp.noise_multiplier, rel=0.02)
        direct.compose(dp_event.GaussianDpEvent(measured))
        direct.compose(dp_event.GaussianDpEvent(2 * dp.clipped_count_stddev))
        recorded = strategy.recorder.rounds[server_round]["epsilon"]
        assert recorded == pytest.approx(direct.get_epsilon(delta), rel=0.02)
    # ...and the update's and the count's noise compose to dp-noise-multiplier.
    alone = RdpAccountant()
    alone.compose(dp_event.GaussianDpEvent(0.4), 5)
    assert strategy.ledger.epsilon == pytest.approx(alone.get_epsilon(delta))


def test_a_missing_norm_bit_leaves_its_client_out(tmp_path):
    # Under adaptive clipping a client that sends no norm bit fails (central
    # DP then voids the round), instead of ending the run with a KeyError.
    strategy = _central(tmp_path, "central-adaptive", 3, **{"dp-noise-multiplier": 0.1})
    zeros = ndarrays_to_parameters([np.zeros(5, dtype=np.float32)])
    strategy.configure_fit(1, zeros, strategy.client_manager)
    updates = _updates(strategy, [[np.zeros(5, np.float32)]] * 3, {KEY_NORM_BIT: False})
    del updates[1][1].metrics[KEY_NORM_BIT]
    updates[2][1].metrics[KEY_NORM_BIT] = "yes"
    norm = strategy.strategy.clipping_norm
    assert strategy.aggregate_fit(1, updates, []) == (None, {})
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_failures"] == [
        "partition 1: metric 'norm_bit' = None, expected true or false",
        "partition 2: metric 'norm_bit' = 'yes', expected true or false",
    ]
    assert "central DP needs every client" in round_1["fit_voided"]
    assert strategy.strategy.clipping_norm == norm and strategy.ledger.epsilon == 0


def test_a_node_that_cannot_say_who_it_is_does_not_void_a_central_dp_round(tmp_path):
    # It is never asked: the noise is made for the three that are.
    strategy = _central(tmp_path, "central-fixed", 3)
    liar = _Proxy(3)
    liar.get_properties = lambda *args, **kwargs: GetPropertiesRes(
        OK, {"partition-id": "3", "num-partitions": 10}
    )
    strategy.client_manager.register(liar)
    zeros = ndarrays_to_parameters([np.zeros(5, dtype=np.float32)])
    assert len(strategy.configure_fit(1, zeros, strategy.client_manager)) == 3
    assert strategy.strategy.num_sampled_clients == 3
    updates = _updates(strategy, [[np.zeros(5, np.float32)]] * 3, {})
    assert strategy.aggregate_fit(1, updates, [])[0] is not None
    round_1 = strategy.recorder.rounds[1]
    assert round_1["fit_failures"] == [
        "node node-3 left out: partition-id = '3', expected an integer"
    ]
    assert "fit_voided" not in round_1 and round_1["epsilon"] > 0


def test_epsilon_grows_and_is_dp_accountings_own():
    privacy = _privacy(dp="local").privacy
    ledger = PrivacyLedger(privacy, release=LocalRelease(privacy))
    direct = RdpAccountant()
    spent = []
    for _ in range(5):
        spent.append(ledger.spend())
        direct.compose(dp_event.GaussianDpEvent(local_noise_multiplier(privacy)))
        assert spent[-1] == pytest.approx(direct.get_epsilon(privacy.dp_delta))
    assert all(b > a for a, b in zip(spent, spent[1:], strict=False))


def test_local_dp_is_counted_with_the_gaussian_mechanisms_multiplier():
    privacy = _privacy(
        **{"dp": "local", "dp-local-epsilon": 2.0, "dp-delta": 1e-4}
    ).privacy
    # The Gaussian mechanism's deviation over the sensitivity.
    assert local_noise_multiplier(privacy) == pytest.approx(
        math.sqrt(2 * math.log(12500)) / 2
    )


def _stays(msg: Message, context: Context) -> Message:
    """A client whose training hardly moves the model: one weight, by 1e-3.

    (Flower's clipping divides by the update's norm: an update of zero fails.)
    """
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(ins.parameters)
    arrays[0].flat[0] += 1e-3
    res = FitRes(OK, ndarrays_to_parameters(arrays), 100, {"train_loss": 1.0})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _local_noise(run_config: dict, size: int) -> np.ndarray:
    """What local DP adds to a zero update of `size` weights: the noise alone."""
    context = make_context(run_config | {"dp": "local"}, {"partition-id": 1})
    msg = _fit_message([np.zeros(size, np.float32)], {"server-round": 1})
    reply = privacy_mod(msg, context, _stays)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert (res.num_examples, res.metrics) == (1, {})  # nothing un-noised leaves
    return parameters_to_ndarrays(res.parameters)[0]


def test_local_noise_is_made_for_twice_the_clipping_norm():
    # Two clipped updates can be 2C apart: std = 2C * sqrt(2 ln(1.25 / d)) / e.
    run_config = default_run_config() | {
        "dp-clipping-norm": 0.3,
        "dp-local-epsilon": 4.0,
        "dp-delta": 1e-5,
    }
    noise = _local_noise(run_config, 60_000)
    expected = 2 * 0.3 * math.sqrt(2 * math.log(1.25e5)) / 4.0
    assert noise.std() == pytest.approx(expected, rel=0.01)


def test_local_noise_is_fresh_whatever_the_public_seed():
    # The client seeds NumPy's global generator from (seed, partition, round)
    # before it trains; the noise must not come from it.
    draws = []
    for _ in range(2):
        np.random.seed(42)
        draws.append(_local_noise(default_run_config(), 1000))
    assert abs(np.corrcoef(*draws)[0, 1]) < 0.2
    np.random.seed(42)
    assert abs(np.corrcoef(draws[0], np.random.normal(size=1000))[0, 1]) < 0.2


@pytest.mark.parametrize("dp", ["local", "central-fixed", "central-adaptive"])
def test_under_dp_only_what_the_analysis_covers_leaves_a_client(dp):
    run_config = default_run_config() | {"dp": dp}
    context = make_context(run_config, {"partition-id": 1})
    config = {"server-round": 1, KEY_CLIPPING_NORM: 10.0}
    reply = privacy_mod(
        _fit_message([np.zeros(3, np.float32)], config), context, _stays
    )
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert res.num_examples == 1
    assert set(res.metrics) == ({KEY_NORM_BIT} if dp == "central-adaptive" else set())
    evaluation = Message(
        compat.evaluateins_to_recorddict(
            EvaluateIns(ndarrays_to_parameters([np.zeros(3)]), {}), keep_input=True
        ),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    with pytest.raises(PermissionError, match=f"refused to evaluate under dp = '{dp}'"):
        privacy_mod(evaluation, context, _stays)
    # Opted in: the metrics go, and so does an evaluation, outside epsilon.
    opted = make_context(run_config | {"dp-client-metrics": True}, {"partition-id": 1})
    reply = privacy_mod(_fit_message([np.zeros(3, np.float32)], config), opted, _stays)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert (res.num_examples, res.metrics["train_loss"]) == (1, 1.0)
    assert privacy_mod(evaluation, opted, lambda msg, ctx: "evaluated") == "evaluated"


def test_under_dp_the_server_keeps_no_organizations_values(tmp_path):
    strategy = _central(tmp_path, "central-fixed", 3)
    model = ndarrays_to_parameters([np.zeros(5, dtype=np.float32)])
    strategy.configure_fit(1, model, strategy.client_manager)
    # A client that sends its metrics anyway.
    updates = _updates(strategy, [[np.zeros(5, np.float32)]] * 3, {"train_loss": 0.5})
    params, metrics = strategy.aggregate_fit(1, updates, [])
    assert params is not None and metrics == {}
    round_1 = strategy.recorder.rounds[1]
    assert "fit_examples" not in round_1 and "fit_train_loss" not in round_1
    assert round_1["train_loss"] is None and round_1["fit_clients"] == 3
    # No federated evaluation: it would release the clients' un-noised values.
    assert strategy.configure_evaluate(1, model, strategy.client_manager) == []


def test_the_budget_ends_the_run_before_a_round_would_pass_it(tmp_path):
    privacy = _privacy(dp="local").privacy
    # The budget: more than two rounds spend, less than three.
    probe = PrivacyLedger(privacy, release=LocalRelease(privacy))
    spent = [probe.spend() for _ in range(3)]
    ledger = PrivacyLedger(privacy, release=LocalRelease(privacy))
    ledger.max_epsilon = (spent[1] + spent[2]) / 2
    strategy = _checked(tmp_path, FedAvg(), 3, privacy=privacy, ledger=ledger)
    model = ndarrays_to_parameters(get_parameters(Net()))
    for server_round in (1, 2):
        assert strategy.configure_fit(server_round, model, strategy.client_manager)
        updates = _updates(strategy, [get_parameters(Net())] * 3, {})
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


WITHOUT_A_NORM_BIT = """
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from flwr.compat.common import recorddict_compat as compat
import flower_tutorial.simulation as simulation

privacy_mod = simulation.privacy_mod


def forgetful_mod(msg, context, call_next):
    # Partition 1's client sends no norm bit in round 1.
    reply = privacy_mod(msg, context, call_next)
    if reply.content and "fitres.metrics" in reply.content.config_records:
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        first = not hasattr(forgetful_mod, "done")
        if context.node_config["partition-id"] == 1 and first:
            forgetful_mod.done = True
            del res.metrics[KEY_NORM_BIT]
            reply.content = compat.fitres_to_recorddict(res, keep_input=True)
    return reply


simulation.privacy_mod = forgetful_mod
simulation.run_tutorial_simulation(3, RUN_CONFIG)
"""


def test_a_reply_without_a_norm_bit_costs_its_round_not_the_run(
    run_python, cifar_dir, tmp_path
):
    run_config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": 2,
        "min-fit-clients": 3,
        "min-available-clients": 3,
        "batch-size": 32,
        "dp": "central-adaptive",
        "dp-noise-multiplier": 0.1,
        "output-dir": str(tmp_path),
    }
    code = f"{in_process()}RUN_CONFIG = {run_config!r}\n{WITHOUT_A_NORM_BIT}"
    exit_code, output = run_python(code, timeout=300)
    assert exit_code == 0, output[-4000:]
    rounds = history_of(tmp_path)["rounds"]
    assert rounds[1]["fit_failures"] == [
        "partition 1: metric 'norm_bit' = None, expected true or false"
    ]
    assert "central DP needs every client" in rounds[1]["fit_voided"]
    assert "epsilon" not in rounds[1]
    assert rounds[2]["fit_failures"] == [] and rounds[2]["epsilon"] > 0
