"""Pictures people would rather look at than numbers: training curves and data-wait shares, and
the one PNG writer (attention pictures, which need a model, are in ``whitebox.commands``)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List

from .common import atomic_write

_LOSS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Contrastive_loss: ([0-9.]+)")


def open_clip_losses(log_path: os.PathLike) -> List[tuple]:
    """(fractional epoch, loss) pairs from an open_clip_train ``out.log``."""
    points = []
    for line in Path(log_path).read_text().splitlines():
        m = _LOSS.search(line)
        if m:
            epoch, done, total, loss = int(m[1]), int(m[2]), int(m[3]), float(m[4])
            points.append((epoch + done / total, loss))
    return points


_TIMES = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def open_clip_data_wait(log_path: os.PathLike) -> float:
    """Share of step time spent waiting for data over a whole open_clip_train run.

    Each log line's ``Data (t)`` / ``Batch (t)`` average the steps since the line before in
    that epoch; they are weighted by that step count.
    """
    data = batch = 0.0
    prev, per_step = {}, None
    for line in Path(log_path).read_text().splitlines():
        m = _TIMES.search(line)
        if not m:
            continue
        epoch, done = int(m[1]), int(m[2])
        per_step = per_step or done  # the first line of a run is its first step
        steps = max((done - prev.get(epoch, 0)) / per_step, 1.0)
        prev[epoch] = done
        data += steps * float(m[4])
        batch += steps * float(m[5])
    return data / batch if batch else float("nan")


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` whole or not at all (temporary file, then rename)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_curves(curves: Dict[str, List[tuple]], path: os.PathLike, ylabel: str = "contrastive loss") -> Path:
    return plot_panels({ylabel: curves}, path)


def plot_panels(panels: Dict[str, Dict[str, List[tuple]]], path: os.PathLike, xlabel: str = "epoch") -> Path:
    """Side by side, one panel per y-axis label, each with its labelled (x, y) curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1.5, 3.5), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels.items()):
        for label, pts in curves.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    save_png(fig, Path(path))
    return Path(path)
