"""The error-versus-tolerance plot of a report (errors.png beside report.md): one column per operator (op level, then
blocks and the model's logits), one point per check at its error as a fraction of its absolute tolerance (log
scale, a line at 1), coloured by dtype, with cpu_ref's own error on the same inputs as a hollow mark.

matplotlib is an optional extra (`pip install 'deepseek-v3-portable[plot]'`): without it render() returns None and
the report says how to get the plot; nothing fails."""

from __future__ import annotations

import io
import math

INSTALL = "`pip install 'deepseek-v3-portable[plot]'` (or `pip install matplotlib`)"
COLOURS = {"float32": "#1f77b4", "bfloat16": "#d62728", "float16": "#2ca02c", "float64": "#7f7f7f"}
FLOOR = 1e-6  # fractions below this (exact results) are drawn at it
CEILING = 1e3  # infinite errors (NaN in the output) are drawn at it


def _matplotlib():
    """matplotlib's Figure and Agg canvas, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def unavailable() -> str:
    """Why there is no plot and how to get one (shown in report.md)."""
    return (f"matplotlib is not installed; {INSTALL}, then `python -m conformance.render DIR` (DIR: this report's "
            f"directory) draws it from report.json without running anything again.")


def _value(v) -> float | None:
    if v == "inf":
        return math.inf
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def points(report: dict) -> list[tuple[str, str, float, float | None]]:
    """(column, dtype, err / tol, cpu_ref err / tol) for every check with an error and an absolute tolerance."""
    out = []
    for c in report["checks"]:
        err, ref, tol = _value(c.get("rel_err")), _value(c.get("ref_rel_err")), _value(c.get("tolerance"))
        if err is None or tol is None or tol <= 0:
            continue
        column = c["op"] if c["level"] == "op" else f"{c['level']}:{c['op']}"
        out.append((column, c.get("dtype") or "-", err / tol, None if ref is None else ref / tol))
    return out


def _clip(v: float) -> float:
    return CEILING if not math.isfinite(v) else min(max(v, FLOOR), CEILING)


def render(report: dict) -> bytes | None:
    """The plot as PNG bytes; None when matplotlib is absent or no check has an error and a tolerance."""
    mpl = _matplotlib()
    data = points(report)
    if mpl is None or not data:
        return None
    Figure, Canvas = mpl
    columns = list(dict.fromkeys(col for col, _, _, _ in data))
    dtypes = sorted({d for _, d, _, _ in data}, key=lambda d: list(COLOURS).index(d) if d in COLOURS else 99)
    fig = Figure(figsize=(max(7.0, 0.9 * len(columns) + 3.5), 4.5), dpi=100)
    Canvas(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.6 / max(1, len(dtypes))
    for k, dtype in enumerate(dtypes):
        colour = COLOURS.get(dtype, "#9467bd")
        offset = (k - (len(dtypes) - 1) / 2) * width
        mine = [(columns.index(col) + offset, frac, ref) for col, d, frac, ref in data if d == dtype]
        ax.scatter([x for x, _, _ in mine], [_clip(f) for _, f, _ in mine], s=22, color=colour, label=dtype,
                   zorder=3)
        refs = [(x, r) for x, _, r in mine if r is not None]
        ax.scatter([x for x, _ in refs], [_clip(r) for _, r in refs], s=40, facecolors="none", edgecolors=colour,
                   linewidths=0.8, zorder=2, label=f"cpu_ref {dtype}")
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", zorder=1)
    ax.text(len(columns) - 0.5, 1.15, "tolerance", ha="right", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 2, CEILING * 2)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=35, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylabel("error / tolerance")
    env = report["environment"]
    ax.set_title(f"{env['backend']} ({env['mode']}), cases {env['case_set']}, seed {env['seed']}", fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.text(-0.5, FLOOR * 1.3, f"exact (<= {FLOOR:g})", fontsize=7, va="bottom", color="#555555")
    ax.text(-0.5, CEILING * 0.7, "NaN / inf", fontsize=7, va="top", color="#555555")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
