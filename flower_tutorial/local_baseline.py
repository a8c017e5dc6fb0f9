"""flower_tutorial: the local baseline, one organization training on its data alone.

The tutorial's step 1 ("Centralized Training with PyTorch")::

    python -m flower_tutorial.local_baseline --epochs 5

trains the tutorial's CNN (or `initial-checkpoint`) on one partition (partition 0
of 10 by default), prints the validation loss and accuracy after each epoch and the
final test accuracy, and writes history.json, final_model.pt and accuracy/loss plots
to a new folder under the run config's `output-dir`. It is the baseline a federation
should beat.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flwr.common.config import parse_config_args

from flower_tutorial.config import NodeSettings, RunSettings, app_run_config
from flower_tutorial.outputs import (
    load_checkpoint,
    make_run_dir,
    save_model,
    write_json,
)
from flower_tutorial.plots import plot_curves
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
        "--run-config",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="override run-config keys of pyproject.toml, as with `flwr run`, "
        "e.g. --run-config \"dataset='/data/cifar10' batch-size=64\"",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the local baseline; return what it wrote to history.json."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        run_config = app_run_config(parse_config_args(args.run_config))
        settings = RunSettings.from_run_config(run_config)
        node = NodeSettings.from_node_config(
            {"partition-id": args.partition_id, "num-partitions": args.num_partitions}
        )
        if args.epochs < 1:
            raise ValueError(f"--epochs = {args.epochs} is not allowed: expected >= 1.")
    except ValueError as err:
        parser.error(str(err))

    set_seed(settings.seed)
    device = get_device()
    try:
        net = (
            load_checkpoint(settings.initial_checkpoint)
            if settings.initial_checkpoint
            else Net()
        ).to(device)
        trainloader, valloader = load_data(
            node.partition_id, node.num_partitions, settings.data
        )
        testloader = load_test_data(settings.data)
        run_dir = make_run_dir(settings.output_dir, "local-baseline")
    except ValueError as err:
        parser.error(str(err))
    epochs = []
    for epoch in range(1, args.epochs + 1):
        set_seed(settings.seed, node.partition_id, epoch)
        train_loss = train(net, trainloader, 1, settings.learning_rate, device)
        val_loss, val_accuracy = test(net, valloader, device)
        print(
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
