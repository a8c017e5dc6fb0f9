"""flower_tutorial: the figures a run leaves behind (matplotlib, PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs happen on servers and in Ray workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# One series of a curve plot: label -> [(x, y), ...].
Series = Mapping[str, Sequence[tuple[float, float]]]

DPI = 100


def plot_curves(
    series: Series, xlabel: str, ylabel: str, title: str, path: Path
) -> None:
    """Plot each named series as a line with markers; skip empty series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=DPI)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds, epochs
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_batch(
    images: torch.Tensor, labels: torch.Tensor, names: Sequence[str], path: Path
) -> None:
    """Show up to 32 normalized images in the tutorial's 4x8 grid, titled by class.

    One picture of the tiled images rather than 32 small axes: a tenth of the
    time to draw, the same grid.
    """
    rows, cols = 4, 8
    # Undo Normalize((0.5,)*3, (0.5,)*3): [-1, 1] back to [0, 1] for display.
    pixels = np.clip(
        (images[: rows * cols].permute(0, 2, 3, 1).cpu().numpy() + 1) / 2, 0, 1
    )
    size = pixels.shape[1]
    gap, caption = 2, 12  # pixels between images, and above each for its class
    cell_h, cell_w = size + caption + gap, size + gap
    sheet = np.ones((rows * cell_h, cols * cell_w, 3))
    fig, ax = plt.subplots(figsize=(12, 6), dpi=DPI)
    for i, image in enumerate(pixels):
        top, left = (i // cols) * cell_h + caption, (i % cols) * cell_w
        sheet[top : top + size, left : left + size] = image
        ax.text(
            left + size / 2,
            top - 1,
            names[int(labels[i])],
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.imshow(sheet, interpolation="nearest")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_label_distribution(
    counts: np.ndarray, names: Sequence[str], path: Path
) -> None:
    """Stacked bars: how many images of each class every partition holds."""
    num_partitions = counts.shape[0]
    width = max(6.4, 0.35 * num_partitions + 3)
    fig, ax = plt.subplots(figsize=(width, 4.0), dpi=DPI)
    bottom = np.zeros(num_partitions)
    colours = plt.get_cmap("tab10")
    for label, name in enumerate(names):
        ax.bar(
            range(num_partitions),
            counts[:, label],
            bottom=bottom,
            label=name,
            color=colours(label % 10),
        )
        bottom += counts[:, label]
    ax.set(xlabel="partition (organization)", ylabel="images")
    ax.set_title("Labels per partition")
    ax.legend(title="class", fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_organizations(
    accuracy: Sequence[Sequence[float | None]],
    organizations: Sequence[str],
    rounds: Sequence[int],
    path: Path,
) -> None:
    """Draw each organization's accuracy per round as a heatmap (blank: not asked).

    One row an organization, one column a round; the worst of each round is the
    one the global model serves worst.
    """
    values = np.array(
        [[np.nan if a is None else 100 * a for a in row] for row in accuracy]
    )
    height = 1.6 + 0.35 * len(organizations)
    width = max(6.4, 2.0 + 0.7 * len(rounds))
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    if values.size <= 400:  # room for the numbers
        for (row, col), value in np.ndenumerate(values):
            if not np.isnan(value):
                light = value < np.nanmean(values)
                ax.text(
                    col,
                    row,
                    f"{value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if light else "black",
                )
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_yticks(range(len(organizations)), organizations)
    ax.set(
        xlabel="round",
        ylabel="organization (partition)",
        title="Accuracy on each organization's validation data, %",
    )
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gain(
    organizations: Mapping[str, Mapping[str, float]], epochs: int, path: Path
) -> None:
    """Draw, per organization, its model trained alone against the global model."""
    names = list(organizations)
    local = [100 * organizations[n]["local_accuracy"] for n in names]
    joined = [100 * organizations[n]["global_accuracy"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(names) + 2), 4.0), dpi=DPI)
    ax.bar(x - 0.2, local, 0.4, label=f"trained alone ({epochs} epochs)")
    ax.bar(x + 0.2, joined, 0.4, label="the federation's global model")
    ax.set_xticks(x, names)
    ax.set(
        xlabel="organization (partition)",
        ylabel="accuracy on its validation data, %",
        title="What each organization gains by joining",
    )
    ax.set_ylim(0, 1.25 * max([*local, *joined, 1.0]))  # room for the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
