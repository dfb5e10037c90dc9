"""The benchmark pictures: time and peak memory side by side, both log scale, per config and impl;
a missing bar says why ("did not fit", "not run", "skipped", "error"). Used by run.py and gpu.py."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def why_missing(row: dict) -> str:
    """A short label for a row without a measurement."""
    if not row:
        return "—"
    text = " ".join(str(row.get(k, "")) for k in ("error", "skipped")).lower()
    if row.get("fits") is False or "out of memory" in text or "outofmemory" in text or "not fit" in text:
        return "did not fit"
    if "estimated" in text or "not run" in text:
        return "not run"
    return "skipped" if row.get("skipped") else "error"


def time_memory_axes(axes, rows, impls, title: str) -> None:
    """Fill two axes: forward+backward time (ms) and peak extra memory (MB), bars per config × impl."""
    by = {(r["config"], r["impl"]): r for r in rows}
    cfgs = list(dict.fromkeys(r["config"] for r in rows))
    width = 0.8 / len(impls)
    for ax, key, scale, ylabel in ((axes[0], "median_s", 1e3, "forward+backward (ms)"),
                                   (axes[1], "peak_extra_mb", 1.0, "peak extra memory (MB)")):
        values = [r[key] * scale for r in rows if r.get(key)]
        floor = min(values) / 3 if values else 1.0
        for k, impl in enumerate(impls):
            xs = [i + k * width for i in range(len(cfgs))]
            vals = [by.get((c, impl), {}).get(key) for c in cfgs]
            ax.bar(xs, [v * scale if v else 0 for v in vals], width, label=impl)
            for x, c, v in zip(xs, cfgs, vals):
                if not v:
                    ax.text(x, floor, why_missing(by.get((c, impl), {})), rotation=90, ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cfgs))], cfgs, rotation=20)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor * 0.8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {ylabel.split(' (')[0]}", fontsize=9)
        ax.legend(fontsize=8)
