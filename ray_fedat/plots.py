"""curves.png: natural and robust accuracy and training loss against the round."""
from __future__ import annotations

import os
from typing import Dict, List


def plot_curves(records: List[Dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evaluated = [r for r in records if r.get("natural_acc") is not None]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot([r["round"] for r in evaluated], [100 * r["natural_acc"] for r in evaluated], "o-",
                label="natural accuracy")
    acc_ax.plot([r["round"] for r in evaluated], [100 * r["robust_acc"] for r in evaluated], "s-",
                label="robust accuracy (PGD)")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_ylim(0, 100)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    loss_ax.plot([r["round"] for r in records], [r["train_loss"] for r in records], "o-", color="tab:red")
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("training loss (mean over clients)")
    loss_ax.grid(alpha=0.3)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
