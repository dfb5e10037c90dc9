"""Interpretability: what LoMix learned. Tables ready to log, weight history, and plots.

    rows = lk.report.map_table(crit)           # one dict per map: name, op, subset, weight, ell, ce, dice
    lk.report.operator_weights(crit)           # {"orig": ..., "add": ..., ...}: sum of w_u per operator
    hist = lk.report.WeightHistory(); hist.update(crit)   # once per step (or every k steps)
    lk.report.plot_weights(crit, "weights.png")           # paper Fig. S.8 style bars, grouped by operator
    hist.plot("weights_over_time.png")
"""
from __future__ import annotations

from typing import Optional

import torch


def map_table(crit) -> list[dict]:
    """One row per map: name, operator, subset, current weight, and the last call's ℓ, CE, Dice."""
    weights = crit.weights().detach().cpu()
    terms = crit.last_terms or {}
    rows = []
    for u, m in enumerate(crit.maps):
        row = {"name": m.name, "op": m.op, "subset": m.members, "weight": float(weights[u])}
        for key in ("ell", "ce", "dice"):
            row[key] = float(terms[key][u]) if key in terms else float("nan")
        rows.append(row)
    return rows


def operator_weights(crit) -> dict[str, float]:
    """Sum of the current map weights per operator ("orig" for the originals)."""
    weights = crit.weights().detach().cpu()
    out: dict[str, float] = {}
    for u, m in enumerate(crit.maps):
        out[m.op] = out.get(m.op, 0.0) + float(weights[u])
    return out


def format_table(crit) -> str:
    """The map table as aligned text."""
    lines = [f"{'map':<14}{'op':<6}{'weight':>8}{'loss':>9}{'CE':>9}{'Dice':>8}"]
    for r in map_table(crit):
        lines.append(f"{r['name']:<14}{r['op']:<6}{r['weight']:>8.4f}{r['ell']:>9.4f}{r['ce']:>9.4f}{r['dice']:>8.4f}")
    return "\n".join(lines)


class WeightHistory:
    """Per-map weights over training steps (a list of (step, (M,) tensor))."""

    def __init__(self):
        self.steps: list[int] = []
        self.weights: list[torch.Tensor] = []
        self.names: Optional[list[str]] = None
        self.ops: Optional[list[str]] = None

    def update(self, crit, step: Optional[int] = None) -> None:
        self.names = crit.map_names
        self.ops = [m.op for m in crit.maps]
        self.steps.append(len(self.steps) if step is None else step)
        self.weights.append(crit.weights().detach().cpu().clone())

    def operator_series(self) -> dict[str, list[float]]:
        """Per-operator sums of weights at every recorded step."""
        out: dict[str, list[float]] = {}
        for w in self.weights:
            for op in dict.fromkeys(self.ops):
                mask = torch.tensor([o == op for o in self.ops])
                out.setdefault(op, []).append(float(w[mask].sum()))
        return out

    def plot(self, path: str) -> None:
        """Per-operator weight sums over steps (PNG)."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for op, series in self.operator_series().items():
            ax.plot(self.steps, series, label=op)
        ax.set_xlabel("step")
        ax.set_ylabel("sum of effective weights w_u")
        ax.set_title("LoMix weights per operator over training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def plot_weights(crit, path: str) -> None:
    """One bar per map, grouped and coloured by operator (the paper's Fig. S.8 style), PNG."""
    plt = _pyplot()
    rows = map_table(crit)
    ops = list(dict.fromkeys(r["op"] for r in rows))
    colors = {op: plt.cm.tab10(i) for i, op in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["weight"] for r in rows], color=[colors[r["op"]] for r in rows])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel(f"effective weight w_u ({crit.weighting})")
    ax.set_ylim(0, 1.3 * max(r["weight"] for r in rows))  # room for the legend
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[op]) for op in ops]
    ax.legend(handles, ops, ncol=len(ops), fontsize=8)
    ax.set_title("Learned LoMix map weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    return plt
