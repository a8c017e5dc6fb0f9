"""flower_tutorial: the local baseline, one organization training on its data alone.

The tutorial's step 1 ("Centralized Training with PyTorch")::

    python -m flower_tutorial.local_baseline --epochs 5

trains the tutorial's CNN (or `initial-checkpoint`) on one partition (partition 0
of 10 by default), prints the validation loss and accuracy after each epoch and the
final test accuracy, and writes history.json, final_model.pt and accuracy/loss plots
to a new folder under the run config's `output-dir`. It is the baseline a federation
should beat. For every organization of a federated run at once::

    python -m flower_tutorial.local_baseline --compare outputs/<run folder>

trains each of the run's organizations alone, with the run's own config, and sets
each one's local model against the run's final global model on that
organization's validation data: `local_baselines.json` and `gain.png`, in the run's
folder, say what each organization gains by joining.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from flwr.common.config import parse_config_args

from flower_tutorial.config import NodeSettings, RunSettings, app_run_config
from flower_tutorial.outputs import (
    load_checkpoint,
    make_run_dir,
    save_model,
    write_json,
)
from flower_tutorial.plots import plot_curves, plot_gain
from flower_tutorial.task import (
    Net,
    get_device,
    load_data,
    load_test_data,
    set_seed,
    test,
    train,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flower_tutorial.local_baseline",
        description="Train the tutorial's CNN on one partition, without federation.",
    )
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--compare",
        metavar="RUN_FOLDER",
        help="train every organization of this federated run alone, with its run "
        "config, and compare each with the run's final global model",
    )
    parser.add_argument(
        "--run-config",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="override run-config keys of pyproject.toml, as with `flwr run`, "
        "e.g. --run-config \"dataset='/data/cifar10' batch-size=64\"",
    )
    return parser


def train_alone(
    net: Net,
    node: NodeSettings,
    settings: RunSettings,
    num_epochs: int,
    loaders: tuple[Iterable, Iterable],
    say: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Train `net` on one organization's data alone; return each epoch's record.

    Each epoch is seeded by (seed, partition, epoch), as each federated round is
    by (seed, partition, round).
    """
    device = get_device()
    net.to(device)
    trainloader, valloader = loaders
    epochs = []
    for epoch in range(1, num_epochs + 1):
        set_seed(settings.seed, node.partition_id, epoch)
        train_loss = train(net, trainloader, 1, settings.learning_rate, device)
        val_loss, val_accuracy = test(net, valloader, device)
        say(
            f"Epoch {epoch}: train loss {train_loss:.4f}, "
            f"validation loss {val_loss:.4f}, accuracy {val_accuracy:.4f}"
        )
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "validation_loss": val_loss,
                "validation_accuracy": val_accuracy,
            }
        )
    return epochs


def compare(
    run_dir: Path, num_epochs: int, fail: Callable[[str], NoReturn]
) -> dict[str, Any]:
    """Set each organization trained alone against a run's final global model.

    Each is trained from the run's initial model with the run's config (its
    dataset, split, seed and learning rate), and both models are tested on that
    organization's validation data, and on the test split (everyone's data).
    Writes local_baselines.json and gain.png into `run_dir`; returns what the
    JSON holds.
    """
    where = f"--compare {str(run_dir)!r}"
    try:
        history = json.loads((run_dir / "history.json").read_text())
        settings = RunSettings.from_run_config(history["run_config"])
        num_partitions = history["num_partitions"]
        global_net = load_checkpoint(str(run_dir / "final_model.pt"))
    except (OSError, KeyError, TypeError, ValueError) as err:
        fail(
            f"{where} is not allowed: expected the folder of a finished federated "
            f"run, with history.json and final_model.pt ({type(err).__name__}: {err})"
        )
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        fail(f"{where}: its history.json names no number of partitions")
    device = get_device()
    global_net.to(device)
    testloader = load_test_data(settings.data)
    _, global_test_accuracy = test(global_net, testloader, device)
    organizations: dict[str, dict[str, float]] = {}
    for pid in range(num_partitions):
        node = NodeSettings(pid, num_partitions)
        loaders = load_data(pid, num_partitions, settings.data)
        set_seed(settings.seed)  # the run's initial model, as the server made it
        local = _initial_model(settings)
        epochs = train_alone(local, node, settings, num_epochs, loaders, say=_quiet)
        _, global_accuracy = test(global_net, loaders[1], device)
        local_accuracy = epochs[-1]["validation_accuracy"]
        organizations[str(pid)] = {
            "examples": len(loaders[0].dataset),
            "local_accuracy": local_accuracy,
            "global_accuracy": global_accuracy,
            "gain": global_accuracy - local_accuracy,
            # ...and on everyone's data: the test split, balanced.
            "local_test_accuracy": test(local, testloader, device)[1],
        }
        print(
            f"Partition {pid}: alone {100 * local_accuracy:.2f}%, federated "
            f"{100 * global_accuracy:.2f}%, gain "
            f"{100 * (global_accuracy - local_accuracy):+.2f} points"
        )
    result = {
        "epochs": num_epochs,
        "global_test_accuracy": global_test_accuracy,
        "organizations": organizations,
    }
    write_json(result, run_dir / "local_baselines.json")
    plot_gain(organizations, num_epochs, run_dir / "gain.png")
    print(f"Outputs: {run_dir / 'local_baselines.json'}, {run_dir / 'gain.png'}")
    return result


def _initial_model(settings: RunSettings) -> Net:
    """Return the model a run starts from: `initial-checkpoint`, or Net()."""
    if settings.initial_checkpoint:
        return load_checkpoint(settings.initial_checkpoint)
    return Net()


def _quiet(line: str) -> None:
    """Say nothing of each epoch (one line per organization says enough)."""


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the local baseline; return what it wrote to history.json."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs = {args.epochs} is not allowed: expected >= 1.")
    if args.compare:
        return compare(Path(args.compare).expanduser(), args.epochs, parser.error)
    try:
        run_config = app_run_config(parse_config_args(args.run_config))
        settings = RunSettings.from_run_config(run_config)
        node = NodeSettings.from_node_config(
            {"partition-id": args.partition_id, "num-partitions": args.num_partitions}
        )
    except ValueError as err:
        parser.error(str(err))

    set_seed(settings.seed)
    device = get_device()
    try:
        net = _initial_model(settings).to(device)
        trainloader, valloader = load_data(
            node.partition_id, node.num_partitions, settings.data
        )
        testloader = load_test_data(settings.data)
        run_dir = make_run_dir(settings.output_dir, "local-baseline")
    except ValueError as err:
        parser.error(str(err))
    epochs = train_alone(net, node, settings, args.epochs, (trainloader, valloader))
    test_loss, test_accuracy = test(net, testloader, device)
    print(f"Final test loss {test_loss:.4f}, accuracy {test_accuracy:.4f}")

    history = {
        "run_config": run_config,
        "partition_id": node.partition_id,
        "num_partitions": node.num_partitions,
        "epochs": epochs,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
    }
    write_json(history, run_dir / "history.json")
    save_model(net.cpu(), run_dir / "final_model.pt")
    title = f"Partition {node.partition_id} training alone"

    def series(key: str) -> list[tuple[float, float]]:
        return [(e["epoch"], e[key]) for e in epochs]

    plot_curves(
        {"validation": series("validation_accuracy")},
        "epoch",
        "accuracy",
        title,
        run_dir / "accuracy.png",
    )
    plot_curves(
        {"validation": series("validation_loss"), "training": series("train_loss")},
        "epoch",
        "cross-entropy loss",
        title,
        run_dir / "loss.png",
    )
    print(f"Outputs: {run_dir}")
    return history


if __name__ == "__main__":
    main()
