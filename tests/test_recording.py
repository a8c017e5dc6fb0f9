"""Run outputs and bad input: clear errors before training, nothing half-written."""

import pytest
import torch
from conftest import default_run_config
from flwr.common import Context, RecordDict, parameters_to_ndarrays
from torch import nn

from flower_tutorial.local_baseline import main as local_baseline_main
from flower_tutorial.outputs import load_checkpoint, make_run_dir, write_json
from flower_tutorial.recording import progress_line
from flower_tutorial.server_app import server_fn
from flower_tutorial.task import Net


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
