"""PNG plots of a training run: learning curves and S per layer over time (matplotlib, optional)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("sgs_fx")


def plot_run(history: dict, out: Path, max_layers: int = 8) -> list[str]:
    """Write ``curves.png`` and (for SGS runs) ``scales.png`` into ``out``; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'sgs_fx[plots]')")
        return []
    written = []
    m = history["metrics"]
    if m:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        epochs = [r["epoch"] for r in m]
        axes[0].plot(epochs, [r["train_loss"] for r in m], label="train")
        axes[0].plot(epochs, [r["test_loss"] for r in m], label="test")
        axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
        axes[1].plot(epochs, [r["train_acc"] for r in m], label="train")
        axes[1].plot(epochs, [r["test_acc"] for r in m], label="test")
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        for ax in axes:
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
        written.append(str(out / "curves.png"))
    snaps = history.get("scales") or {}
    if snaps:
        import numpy as np

        epochs = sorted(snaps, key=int)
        layers = list(snaps[epochs[0]])[:max_layers]
        fig, axes = plt.subplots(len(layers), len(epochs), figsize=(1.6 * len(epochs) + 1.5, 1.6 * len(layers)),
                                 squeeze=False)
        vmax = max(float(np.max(snaps[e][n])) for e in epochs for n in layers)
        for i, name in enumerate(layers):
            for j, e in enumerate(epochs):
                s = np.asarray(snaps[e][name])
                s = s if s.ndim == 2 else s.reshape(1, -1) if s.ndim == 1 else s[s.shape[0] // 2]
                ax = axes[i][j]
                im = ax.imshow(s, vmin=0, vmax=vmax, cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"epoch {e}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(name, fontsize=7)
        fig.colorbar(im, ax=axes, shrink=0.6, label="S")
        fig.suptitle("S per layer when recomputed")
        fig.savefig(out / "scales.png", dpi=100)
        plt.close(fig)
        written.append(str(out / "scales.png"))
    return written
