"""flower_tutorial: the figures a run leaves behind (matplotlib, PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs happen on servers and in Ray workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr_datasets.partitioner import Partitioner  # noqa: E402
from flwr_datasets.visualization import plot_label_distributions  # noqa: E402
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
    """Show up to 32 normalized images in the tutorial's 4x8 grid, titled by class."""
    fig, axs = plt.subplots(4, 8, figsize=(12, 6), dpi=DPI)
    # Undo Normalize((0.5,)*3, (0.5,)*3): [-1, 1] back to [0, 1] for display.
    pixels = (images[:32].permute(0, 2, 3, 1).cpu().numpy() + 1) / 2
    for i, ax in enumerate(axs.flat):
        ax.axis("off")
        if i < len(pixels):
            ax.imshow(np.clip(pixels[i], 0, 1))
            ax.set_title(names[int(labels[i])], fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_label_distribution(partitioner: Partitioner, label: str, path: Path) -> None:
    """Stacked bars (Flower Datasets' plot): each partition's images per class."""
    fig, _, _ = plot_label_distributions(
        partitioner,
        label_name=label,
        legend=True,
        legend_title="class",
        title="Labels per partition",
        figsize=(6.4, 4.0),
        cmap="tab10",
    )
    # The legend sits outside the axes; "tight" keeps it in the picture.
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
