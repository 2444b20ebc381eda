"""Plots of interpolation curves (matplotlib, imported on use, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rebasin.checkpoint.atomic import write_with

COLORS = {"naive": "#888888", "aligned": "#1f6fd1"}


def plot_curves(
    evaluation: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> list[Path]:
    """Draw loss and accuracy vs alpha for every path (train solid, test dashed), endpoints
    marked; write ``path`` (PNG) and the same figure as SVG beside it. Returns the files."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, curve in evaluation["paths"].items():
        color = COLORS.get(name)
        alphas = curve["alphas"]
        for split, style in (("train", "-"), ("test", "--")):
            kw = {"color": color, "linestyle": style, "linewidth": 2 if split == "train" else 1.5}
            b = curve["barriers"][split]["loss"]["linear"]
            ax_loss.plot(alphas, curve["loss"][split], label=f"{name} {split} (barrier {b:.3f})", **kw)
            ax_acc.plot(alphas, [100 * a for a in curve["acc"][split]], label=f"{name} {split}", **kw)
    for ax in (ax_loss, ax_acc):
        first = next(iter(evaluation["paths"].values()))
        for split, marker in (("train", "o"), ("test", "s")):
            ys = first["loss"][split] if ax is ax_loss else [100 * a for a in first["acc"][split]]
            ax.scatter([0, 1], [ys[0], ys[-1]], color="black", marker=marker, zorder=5, s=28)
        ax.set_xlabel("alpha  (0 = model A, 1 = model B)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_xticklabels(["0\nA", "0.25", "0.5", "0.75", "1\nB"])
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.set_title("loss along the linear path")
    ax_acc.set_title("accuracy along the linear path")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    data = evaluation.get("data", {}).get("name", "")
    bn = evaluation.get("bn", "none")
    model = evaluation.get("model", {}).get("name", "")
    fig.suptitle(title or f"linear mode connectivity: {model} on {data} (BatchNorm: {bn})")
    return _save(fig, path)


def plot_map(pairwise: Mapping[str, Any], path: str | os.PathLike[str]) -> list[Path]:
    """Heatmaps of the pairwise map (aligned beside naive, one colour scale), basins outlined;
    write ``path`` (PNG) and the same figure as SVG beside it. Returns the files."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = [("naive", pairwise["naive"])]
    if pairwise["aligned"] is not None:
        panels.insert(0, ("aligned", pairwise["aligned"]))
    n = len(pairwise["models"])
    top = max([v for _, m in panels for row in m for v in row] + [1e-9])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1, 4.2), constrained_layout=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    image = None
    for ax, (label, matrix) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=top)
        for i in range(n):
            for j in range(n):
                if i != j:
                    v = matrix[i][j]
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 0.6 * top else "black")  # fmt: skip
        if label == "aligned" or pairwise["aligned"] is None:
            for group in pairwise["basins"]:
                lo, hi = min(group), max(group)
                if len(group) > 1 and hi - lo + 1 == len(group):  # contiguous: outline the block
                    ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo + 1, hi - lo + 1,
                                           fill=False, edgecolor="red", linewidth=2))  # fmt: skip
        ticks = [f"M{k + 1}" for k in range(n)]
        ax.set_xticks(range(n), ticks)
        ax.set_yticks(range(n), ticks)
        ax.set_title(f"{label} {pairwise['measure'].split(' (')[0]}")
    assert image is not None
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(f"pairwise loss barriers of {n} models (basins below {pairwise['basin_threshold']})")
    return _save(fig, path)


def plot_diagnosis(diagnosis: Mapping[str, Any], path: str | os.PathLike[str]) -> list[Path]:
    """One figure: per layer, the singular-direction agreement before and after alignment (bars)
    and, where measured, the barrier the layer holds alone (line, right axis); PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layers = diagnosis["layers"]
    xs = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(layers) + 3), 4.2), constrained_layout=True)
    ax.bar(
        [x - 0.2 for x in xs],
        [entry["before"] for entry in layers],
        0.4,
        color=COLORS["naive"],
        label="before",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [entry["after"] for entry in layers],
        0.4,
        color=COLORS["aligned"],
        label="after",
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"top-{diagnosis['k']} singular-direction agreement")
    ax.set_xticks(xs, [entry["layer"] for entry in layers], rotation=60, ha="right", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    if any(entry.get("barrier") is not None for entry in layers):
        ax2 = ax.twinx()
        ys = [entry.get("barrier") for entry in layers]
        ax2.plot(
            xs,
            [y if y is not None else float("nan") for y in ys],
            "o-",
            color="#d1491f",
            label="layer barrier",
        )
        ax2.set_ylabel("test loss barrier, this layer alone")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.set_title("where the alignment holds, and where the barrier sits")
    return _save(fig, path)


def plot_widths(panels: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> list[Path]:
    """Accuracy against merged width, one panel per setting: ``panels[title]`` maps a method to
    ``{"widths": [...], "acc": [...]}`` (one point for a method of one width); PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), constrained_layout=True)
    for ax, (title, methods) in zip(axes if len(panels) > 1 else [axes], panels.items(), strict=True):
        for name, m in methods.items():
            style = "o-" if len(m["widths"]) > 1 else "s"
            ax.plot(m["widths"], m["acc"], style, label=name, markersize=7)
        ax.set_title(title)
        ax.set_xlabel("merged width (x A's)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike[str]) -> list[Path]:
    """Write the figure to ``path`` (PNG) and as SVG beside it, each atomically; close it."""
    import matplotlib.pyplot as plt

    png = Path(path)
    svg = png.with_suffix(".svg")
    try:
        write_with(png, lambda t: fig.savefig(t, dpi=120, format="png"))
        write_with(svg, lambda t: fig.savefig(t, format="svg"))
    finally:
        plt.close(fig)
    return [png, svg]
