"""Figures shared by the notebooks (matplotlib only; every function returns its figure, except
[`show_saved`][], which displays figures already written)."""

import matplotlib.pyplot as plt
from matplotlib.colors import PowerNorm
import numpy as np


def corner(
    samples: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    bins: int = 64,
    limits: tuple[float, float] = (-3.0, 3.0),
    title: str | None = None,
    size: float = 1.4,
):
    """Corner plot: 1-D histograms on the diagonal, 2-D histograms below it (paper Fig. 3).

    `reference` (e.g. the ground truth) is drawn above the diagonal, mirrored, and as a line on
    the diagonal, so the two distributions can be compared panel by panel. Densities are shown
    on a square-root colour scale, so that thin manifolds stay visible.
    """
    samples = np.asarray(samples)
    d = samples.shape[1]
    fig, axes = plt.subplots(d, d, figsize=(size * d, size * d), squeeze=False)
    edges = np.linspace(*limits, bins + 1)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if i == j:
                ax.hist(samples[:, i], edges, density=True, color="C0", alpha=0.6)
                if reference is not None:
                    ax.hist(np.asarray(reference)[:, i], edges, density=True, histtype="step", color="k")
            elif i > j:
                ax.hist2d(samples[:, j], samples[:, i], [edges, edges], cmap="Blues", norm=PowerNorm(0.5))
            elif reference is not None:
                ref = np.asarray(reference)
                ax.hist2d(ref[:, j], ref[:, i], [edges, edges], cmap="Greys", norm=PowerNorm(0.5))
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return fig


def image_grid(
    rows: dict[str, np.ndarray],
    *,
    columns: int = 8,
    size: float = 1.0,
    title: str | None = None,
    limits: dict[str, tuple[float, float]] | None = None,
):
    """Rows of images, one labelled row per entry of `rows` (paper Figs. 4-6).

    Each value is an array `(N, C, H, W)` of floats in the latent range $[-2, 2]$ (shown as
    $[0, 1]$ with clipping) or `(N, H, W)` greyscale, shown with the row's `limits[label]`
    `(vmin, vmax)` if given, else with each image's own limits; the first `columns` images of
    each row are drawn.
    """
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(size * columns, size * len(rows) + 0.4 * bool(title)), squeeze=False
    )
    for r, (label, images) in enumerate(rows.items()):
        images = np.asarray(images)[:columns]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            image = images[c]
            if image.ndim == 3:
                ax.imshow(np.clip((np.moveaxis(image, 0, -1) + 2) / 4, 0, 1), interpolation="nearest")
            else:
                vmin, vmax = (limits or {}).get(label, (None, None))
                ax.imshow(image, cmap="gray", interpolation="nearest", vmin=vmin, vmax=vmax)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def mark_diverged(axes, history: list[dict], threshold: float = 1.0) -> list[int]:
    """Shades, on every panel of a per-lap figure, the laps whose E-step solve diverged (a mean
    relative `residual` above `threshold`, see `diemlib.em.warn_if_diverged`) and labels the first
    panel; returns those laps."""
    diverged = [m["lap"] for m in history if not m.get("residual", 0.0) <= threshold]
    for ax in np.ravel(axes):
        for i, lap in enumerate(diverged):
            ax.axvspan(lap - 0.4, lap + 0.4, color="red", alpha=0.15, lw=0,
                       label="E-step solve diverged" if i == 0 and ax is np.ravel(axes)[0] else None)
    if diverged:
        np.ravel(axes)[0].legend()
    return diverged


def log_axis(ax, axis: str = "x") -> None:
    """A log scale labelled at round values that fit the data: 1, 2, 5 × 10^k, or finer steps when
    the data span less than a decade (where matplotlib would label every minor tick, one label
    over another). Call it after plotting."""
    ax.set(**{f"{axis}scale": "log"})
    low, high = (ax.get_xlim if axis == "x" else ax.get_ylim)()
    decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
    for mantissas in [(1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), np.arange(1, 10, 0.5)]:
        ticks = [m * 10.0**k for k in decades for m in mantissas if low <= m * 10.0**k <= high]
        if len(ticks) >= 3:
            break
    getattr(ax, f"set_{axis}ticks")(ticks, [f"{t:g}" for t in ticks])
    getattr(ax, f"{axis}axis").set_minor_formatter(plt.NullFormatter())


def mark_unresolved(ax, values, floor: float, samples: int) -> str | None:
    """Says on `ax` when every value of a per-lap curve (q0 included) sits at an estimator's
    `floor`: a flat line there is not a result. Returns the reason, or `None` if resolved."""
    if max(values) > floor:
        return None
    ax.text(0.5, 0.5, f"at the estimator's floor ({floor:g})\nfor $q_0$ and every lap:\nnot resolved with {samples} samples",
            transform=ax.transAxes, ha="center", va="center", bbox=dict(fc="w", ec="0.7"))
    return f"at the estimator's floor {floor:g} for q0 and every lap: not resolved with {samples} samples"


def show_saved(paths) -> None:
    """Displays saved PNG figures at their own size, one after the other (e.g. each lap's
    sample grid, written while the run went and reread when a notebook resumes)."""
    for path in paths:
        image = plt.imread(path)
        plt.figure(figsize=(image.shape[1] / 100, image.shape[0] / 100))
        plt.imshow(image)
        plt.axis("off")
        plt.show()
