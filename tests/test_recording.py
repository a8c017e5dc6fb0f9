"""Run outputs and bad input: clear errors before training, nothing half-written."""

import io
import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from conftest import default_run_config
from flwr.common import (
    Code,
    Context,
    EvaluateRes,
    FitRes,
    GetPropertiesRes,
    RecordDict,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg
from torch import nn

from flower_tutorial import checkpoint
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import RunSettings
from flower_tutorial.local_baseline import main as local_baseline_main
from flower_tutorial.outputs import load_checkpoint, make_run_dir, write_json
from flower_tutorial.recording import RunRecorder, progress_line, spread
from flower_tutorial.server_app import server_fn, weighted_average
from flower_tutorial.stopping import RunStoppedError, stop_on_ctrl_c
from flower_tutorial.strategy import CheckedStrategy
from flower_tutorial.task import Net, get_parameters


def _server_fn(run_config: dict):
    return server_fn(
        Context(
            run_id=7,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config=run_config,
        )
    )


@pytest.fixture
def run_config(cifar_dir, tmp_path) -> dict:
    return default_run_config() | {
        "dataset": str(cifar_dir),
        "output-dir": str(tmp_path / "outputs"),
    }


def test_progress_line_shows_round_time_and_metrics():
    entry = {
        "round": 3,
        "seconds": 12.34,
        "train_loss": 1.5,
        "distributed_accuracy": 0.4123,
        "centralized_accuracy": None,
    }
    assert progress_line(entry, 5) == (
        "[round 3/5] 12.3 s | train loss 1.5000 | federated acc 41.23%"
    )


def test_each_run_gets_its_own_folder(tmp_path):
    first = make_run_dir(str(tmp_path / "out"), 1)
    second = make_run_dir(str(tmp_path / "out"), 1)
    assert first != second and first.is_dir() and second.is_dir()


def test_an_unwritable_output_dir_is_refused(tmp_path, run_config):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"'output-dir' = .*a-file.* cannot create"):
        _server_fn(run_config | {"output-dir": str(blocker / "outputs")})


def test_json_is_written_whole(tmp_path):
    write_json({"a": [1, 2]}, tmp_path / "h.json")
    assert (tmp_path / "h.json").read_text().replace(" ", "").replace("\n", "") == (
        '{"a":[1,2]}'
    )
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]


def test_checkpoints_load_or_explain(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(Net().state_dict(), good)
    assert isinstance(load_checkpoint(str(good)), Net)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    for path in (garbage, other, tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match=r"'initial-checkpoint' = .* could not be"):
            load_checkpoint(str(path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"partitioner": "pathological"}, "'partitioner' = 'pathological'"),
        ({"dirichlet-alpha": 0.0}, "'dirichlet-alpha' = 0.0"),
        ({"dirichlet-alpha": -1.0}, "'dirichlet-alpha' = -1.0"),
        ({"initial-checkpoint": "/no/such/model.pt"}, "'initial-checkpoint'"),
        ({"dataset": "/no/such/cifar10"}, "'dataset' = '/no/such/cifar10'"),
    ],
)
def test_bad_input_stops_the_server_before_anything_is_written(
    run_config, tmp_path, overrides, message
):
    with pytest.raises(ValueError, match=message):
        _server_fn(run_config | overrides)
    assert not (tmp_path / "outputs").exists()


def test_the_server_starts_from_a_checkpoint(run_config, tmp_path):
    saved = Net()
    torch.save(saved.state_dict(), tmp_path / "saved.pt")
    strategy = _server_fn(
        run_config | {"initial-checkpoint": str(tmp_path / "saved.pt")}
    ).strategy.strategy  # FedAvg, inside the checks

    arrays = parameters_to_ndarrays(strategy.initial_parameters)
    for array, tensor in zip(arrays, saved.state_dict().values(), strict=True):
        assert torch.equal(torch.from_numpy(array), tensor)


def test_local_baseline_trains_one_partition(cifar_dir, tmp_path, capsys):
    history = local_baseline_main(
        [
            "--epochs",
            "2",
            "--num-partitions",
            "4",
            "--run-config",
            f"dataset='{cifar_dir}' output-dir='{tmp_path}' batch-size=16",
        ]
    )
    out = capsys.readouterr().out
    assert "Epoch 2: train loss" in out and "Final test loss" in out
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert 0.0 <= history["test_accuracy"] <= 1.0
    (run_dir,) = tmp_path.iterdir()
    assert {p.name for p in run_dir.iterdir()} == {
        "history.json",
        "final_model.pt",
        "accuracy.png",
        "loss.png",
    }


def test_local_baseline_refuses_bad_arguments(cifar_dir, capsys):
    with pytest.raises(SystemExit):
        local_baseline_main(
            [
                "--partition-id",
                "4",
                "--num-partitions",
                "4",
                "--run-config",
                f"dataset='{cifar_dir}'",
            ]
        )
    assert "'partition-id' = 4" in capsys.readouterr().err


# --- An interrupted run keeps the rounds it finished ------------------------------

OK = Status(code=Code.OK, message="")
MODEL = get_parameters(Net())
# What a round writes; the TensorBoard events file is appended to, not rewritten.
ROUND_FILES = ("history.json", "best_model.pt", "checkpoint.pt")


class _Node:
    """A SuperNode of partition `pid` that says so."""

    def __init__(self, pid: int) -> None:
        self.cid = f"node-{pid}"
        self.pid = pid

    def get_properties(self, ins, timeout, group_id) -> GetPropertiesRes:
        return GetPropertiesRes(OK, {"partition-id": self.pid, "num-partitions": 2})


class _SilentGrid:
    """A grid that takes messages and never replies (the clients still train)."""

    def push_messages(self, messages) -> list[str]:
        return [f"message-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids) -> list:
        return []


def _strategy(run_dir: Path) -> CheckedStrategy:
    """The app's strategy over FedAvg and two nodes, for a run of 3 rounds."""
    settings = RunSettings.from_run_config(default_run_config())
    manager = SeededClientManager(timeout=5.0, seed=0)
    for pid in range(2):
        manager.register(_Node(pid))
    recorder = RunRecorder(run_dir, {}, settings.data, 3, save_best_model=True)
    inner = FedAvg(
        min_fit_clients=2,
        min_evaluate_clients=2,
        min_available_clients=2,
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    return CheckedStrategy(inner, client_manager=manager, recorder=recorder)


def _round(strategy: CheckedStrategy, server_round: int, accuracy: float) -> None:
    """Run a whole round as Flower's loop calls the strategy: every client sound."""
    manager = strategy.client_manager
    sent = ndarrays_to_parameters(MODEL)
    fit = strategy.configure_fit(server_round, sent, manager)
    results = [(p, FitRes(OK, i.parameters, 10, {"train_loss": 1.0})) for p, i in fit]
    parameters, _ = strategy.aggregate_fit(server_round, results, [])
    evaluate = strategy.configure_evaluate(server_round, parameters, manager)
    metrics = {"accuracy": accuracy}
    replies = [(p, EvaluateRes(OK, 1.0, 5, metrics)) for p, _ in evaluate]
    strategy.aggregate_evaluate(server_round, replies, [])


def _files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ROUND_FILES}


def test_ctrl_c_in_a_round_keeps_the_rounds_finished_before_it(tmp_path, caller_sigint):
    strategy = _strategy(tmp_path)
    _round(strategy, 1, accuracy=0.5)
    after_round_1 = _files(tmp_path)
    # Round 2: the clients train, and the first Ctrl-C stops the run as
    # run_tutorial_simulation's does; the wait for their replies ends at once.
    manager = strategy.client_manager
    assert strategy.configure_fit(2, ndarrays_to_parameters(MODEL), manager)
    with stop_on_ctrl_c(manager.stop):
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        with pytest.raises(RunStoppedError) as stopped:
            manager.stoppable(_SilentGrid(), 5.0).send_and_receive(["fit", "fit"])
    # Flower's loop hands the clients' errors to the strategy, which ends the run.
    with pytest.raises(RuntimeError, match=r"All 2 clients failed in round 2"):
        strategy.aggregate_fit(2, [], [stopped.value, stopped.value])
    # Round 1's model and checkpoint stay as it left them; no final model.
    files = _files(tmp_path)
    assert files["best_model.pt"] == after_round_1["best_model.pt"]
    assert files["checkpoint.pt"] == after_round_1["checkpoint.pt"]
    assert checkpoint.load(tmp_path).server_round == 1
    assert not (tmp_path / "final_model.pt").exists()
    # history.json: round 1 as it was, and why round 2 did not end.
    before = json.loads(after_round_1["history.json"])["rounds"]
    rounds = json.loads(files["history.json"])["rounds"]
    assert rounds[:-1] == before and [r["round"] for r in before] == [1]
    stop = "RunStoppedError: The run was stopped while waiting for replies."
    assert rounds[-1] == {
        "round": 2,
        "fit_clients": 0,
        "fit_examples": {},
        "fit_train_loss": {},
        "fit_failures": [stop, stop],
    }


def _interrupted_while_writing(name: str, monkeypatch) -> None:
    """Make the writing of `name` stop half-way with KeyboardInterrupt (Ctrl-C)."""
    write_text, save = Path.write_text, torch.save

    def half_then_ctrl_c(path: Path, data: bytes) -> None:
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    def fake_write_text(path: Path, text: str, *args, **kwargs) -> int:
        if Path(path).name.startswith(name):
            half_then_ctrl_c(path, text.encode())
        return write_text(path, text, *args, **kwargs)

    def fake_save(obj, path, *args, **kwargs) -> None:
        # A path, or a file opened at one.
        target = Path(path.name if hasattr(path, "write") else path)
        if not target.name.startswith(name):
            return save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        half_then_ctrl_c(target, buffer.getvalue())

    monkeypatch.setattr(Path, "write_text", fake_write_text)
    monkeypatch.setattr(torch, "save", fake_save)


@pytest.mark.parametrize("interrupted", ROUND_FILES)
def test_ctrl_c_while_a_round_is_written_leaves_every_file_whole(
    tmp_path, monkeypatch, interrupted
):
    strategy = _strategy(tmp_path)
    _round(strategy, 1, accuracy=0.5)
    after_round_1 = _files(tmp_path)
    with monkeypatch.context() as patch:
        _interrupted_while_writing(interrupted, patch)
        with pytest.raises(KeyboardInterrupt):
            _round(strategy, 2, accuracy=0.75)  # better: a new best model
    files = _files(tmp_path)
    # The file being written is the previous round's, whole ...
    assert files[interrupted] == after_round_1[interrupted]
    # ... and every file is readable: the run can be resumed from round 1 or 2.
    rounds = json.loads(files["history.json"])["rounds"]
    assert [r["round"] for r in rounds] in ([1], [1, 2])
    assert checkpoint.load(tmp_path).server_round in (1, 2)
    assert checkpoint.load(tmp_path).server_round <= rounds[-1]["round"]
    assert isinstance(load_checkpoint(str(tmp_path / "best_model.pt")), Net)


# --- Each organization's results ---------------------------------------------------


def test_the_progress_line_shows_whom_the_model_serves_worst():
    entry = {
        "round": 2,
        "seconds": 3.0,
        "distributed_accuracy": 0.5,
        "evaluate_accuracy": {"0": 0.4, "1": 0.9, "2": 0.3, "3": 0.45},
    }
    assert progress_line(entry, 5) == (
        "[round 2/5] 3.0 s | federated acc 50.00% (30.00% worst, 42.50% median, "
        "90.00% best)"
    )
    assert spread({"3": 0.2, "1": 0.2, "7": 0.6}) == {
        "worst": 0.2,
        "worst_organization": "1",
        "median": 0.2,
        "best": 0.6,
        "best_organization": "7",
    }


def _evaluated_run(tmp_path: Path, accuracies: list[dict[int, float]]) -> RunRecorder:
    """A run of 2 organizations whose rounds evaluate with these accuracies."""
    strategy = _strategy(tmp_path)
    strategy.recorder.num_rounds = len(accuracies)
    manager = strategy.client_manager
    sent = ndarrays_to_parameters(MODEL)
    for server_round, accuracy in enumerate(accuracies, start=1):
        fit = strategy.configure_fit(server_round, sent, manager)
        results = [
            (p, FitRes(OK, i.parameters, 10, {"train_loss": 1.0})) for p, i in fit
        ]
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        evaluate = strategy.configure_evaluate(server_round, parameters, manager)
        replies = [
            (
                p,
                EvaluateRes(
                    OK, 1.0 - accuracy[p.pid], 5, {"accuracy": accuracy[p.pid]}
                ),
            )
            for p, _ in evaluate
        ]
        strategy.aggregate_evaluate(server_round, replies, [])
    return strategy.recorder


def test_each_organizations_results_are_recorded_round_by_round(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    recorder = _evaluated_run(tmp_path, [{0: 0.25, 1: 0.75}, {0: 0.5, 1: 0.625}])
    history = json.loads((tmp_path / "history.json").read_text())
    rounds = {r["round"]: r for r in history["rounds"]}
    assert rounds[1]["evaluate_accuracy"] == {"0": 0.25, "1": 0.75}
    assert rounds[2]["evaluate_loss"] == {"0": 0.5, "1": 0.375}
    assert history["organizations"] == {
        "round": 2,
        "organizations": 2,
        "worst": 0.5,
        "worst_organization": "0",
        "median": 0.5625,
        "best": 0.625,
        "best_organization": "1",
    }
    assert (
        "Organizations in round 2 (federated evaluation): worst 50.00% (partition "
        "0), median 56.25%, best 62.50% (partition 1), of 2"
    ) in caplog.text
    assert (tmp_path / "organizations.png").stat().st_size > 0
    # ...and in TensorBoard, one tag per organization.
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"organization 0/validation accuracy", "organization 1/validation loss"} <= (
        set(tags)
    )
    values = events.Scalars("organization 0/validation accuracy")
    assert [(v.step, v.value) for v in values] == [(1, 0.25), (2, 0.5)]
    assert recorder.organizations()["worst_organization"] == "0"


def test_a_run_without_any_organizations_results_has_no_summary(tmp_path):
    strategy = _strategy(tmp_path)
    assert strategy.recorder.organizations() is None


def test_the_local_baseline_compares_each_organization_with_the_federation(
    cifar_dir, tmp_path, capsys
):
    # A finished run of 3 organizations: its config and final model.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = default_run_config() | {"dataset": str(cifar_dir), "batch-size": 16}
    (run_dir / "history.json").write_text(
        json.dumps({"run_config": config, "num_partitions": 3, "rounds": []})
    )
    torch.save(Net().state_dict(), run_dir / "final_model.pt")
    result = local_baseline_main(["--compare", str(run_dir), "--epochs", "1"])
    assert list(result["organizations"]) == ["0", "1", "2"]
    for org in result["organizations"].values():
        assert org["gain"] == pytest.approx(
            org["global_accuracy"] - org["local_accuracy"]
        )
        assert org["examples"] == 64  # 80 % of 240 / 3
        assert 0 <= org["local_test_accuracy"] <= 1
    assert 0 <= result["global_test_accuracy"] <= 1
    saved = json.loads((run_dir / "local_baselines.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (run_dir / "gain.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "Partition 2: alone " in out and "points" in out
    with pytest.raises(SystemExit):
        local_baseline_main(["--compare", str(tmp_path / "none")])
    assert "expected the folder of a finished federated run" in capsys.readouterr().err
