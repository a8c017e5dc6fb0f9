"""The tutorial's own settings through `flwr run`, with one hostile organization.

`flwr run` on a copy of the app in which partition 3's client lies about which
partition it holds, on Flower's Simulation Engine (Ray) with ten SuperNodes and the
defaults: every one of ten sampled, min-fit-clients = 10. The liar costs its own
place: every round goes on with the nine others.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import APP_DIR, first_round_updates, run_dir_of
from flwr_cli import flwr_run_argv, local_superlink

from flower_tutorial.task import Net, get_parameters

NODES = 10
LIAR = 3
LIE = f"""

# A hostile organization: partition {LIAR} gives its partition ID as text.
_honest_properties = FlowerClient.get_properties


def _lying_properties(self, config):
    properties = _honest_properties(self, config)
    if self.partition_id == {LIAR}:
        properties[PARTITION_ID] = str(self.partition_id)
    return properties


FlowerClient.get_properties = _lying_properties
"""


def _lying_app(tmp_path: Path) -> Path:
    """A copy of the app whose partition LIAR lies; `flwr run` builds it."""
    app = tmp_path / "app"
    shutil.copytree(
        APP_DIR / "flower_tutorial",
        app / "flower_tutorial",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(APP_DIR / name, app / name)
    client_app = app / "flower_tutorial" / "client_app.py"
    client_app.write_text(client_app.read_text() + LIE)
    return app


def test_one_hostile_organization_of_ten_costs_only_its_place(
    run_python, cifar_dir, tmp_path
):
    app, out = _lying_app(tmp_path), tmp_path / "out"
    overrides = (
        f"dataset='{cifar_dir}' output-dir='{out}' num-server-rounds=2 batch-size=16"
    )
    # From the app's folder, as a user runs it: Ray's workers start in the
    # driver's folder, and import the app from there.
    with local_superlink(tmp_path / "flwr-home") as env:
        code = (
            "import subprocess, sys\n"
            f"done = subprocess.run({flwr_run_argv(overrides, NODES)!r}, "
            f"env={env!r}, cwd={str(app)!r})\n"
            "sys.exit(done.returncode)\n"
        )
        exit_code, output = run_python(code, timeout=420)
    assert exit_code == 0, output[-4000:]  # and `flwr run` exits 0 when a run fails:
    history = json.loads((run_dir_of(out) / "history.json").read_text())
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2], output[-4000:]
    (liar,) = history["nodes_left_out"]
    assert liar.endswith(f"left out: partition-id = '{LIAR}', expected an integer")
    for entry in rounds[1:]:
        assert entry["fit_failures"] == [liar]
        assert entry["fit_clients"] == NODES - 1
        assert str(LIAR) not in entry["fit_examples"]
    print(json.dumps(rounds[1], indent=1))
    # Each round's model is the example-weighted mean of the other nine updates
    # (trained here as each client trains; two rounds of float32 sums differ in
    # the last digits), and not the mean of all ten.
    net = Net()
    net.load_state_dict(torch.load(run_dir_of(out) / "final_model.pt"))
    got = get_parameters(net)
    others = [pid for pid in range(NODES) if pid != LIAR]
    assert _close(got, _replayed(cifar_dir, others, rounds))
    assert not _close(got, _replayed(cifar_dir, list(range(NODES)), None))


def _replayed(cifar_dir, partitions: list[int], rounds: list | None) -> list:
    """The model after two rounds of FedAvg over `partitions`, trained here.

    With the run's `rounds`, each one's counts of examples are checked too.
    """
    config = {"dataset": str(cifar_dir), "batch-size": 16}
    model = None
    for server_round in (1, 2):
        updates = first_round_updates(config, partitions, NODES, model, server_round)
        if rounds is not None:
            examples = rounds[server_round]["fit_examples"]
            assert [n for _, n in updates] == [examples[str(p)] for p in partitions]
        model = _weighted_mean(updates)
    return model


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    return all(
        np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, want, strict=True)
    )


def _weighted_mean(updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg's mean, summed in partition order as the server sums it."""
    total = sum(n for _, n in updates)
    return [
        sum(arrays[i] * n for arrays, n in updates) / total
        for i in range(len(updates[0][0]))
    ]
