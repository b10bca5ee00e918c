"""Shared figure and table helpers for every notebook: one theme, deterministic files, the numbers beside each figure.

- :func:`set_theme` once per notebook: a colourblind-safe seaborn theme and fixed rcParams (fonts embedded as
  TrueType, a fixed ``svg.hashsalt``), so the same code gives the same bytes on every machine with the same versions.
- :func:`save_figure` writes ``<name>.pdf``, ``<name>.png`` and ``<name>.csv`` (the plotted numbers) with no
  timestamps or software strings in the metadata; saving the same figure twice gives identical files.
- :func:`save_table` writes ``<name>.csv``, ``<name>.md`` and ``<name>.tex``.
- every file is written to a temporary name and renamed (:mod:`mass_dpo.files`): a reader never sees half a table.
- :func:`mean_ci` summarises per-seed records into a mean and a t-based 95% interval (or their range);
  :func:`facet_lines` draws those summaries as lines with bands, one panel per facet; :func:`show` displays a figure
  once in a notebook.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .files import atomic_path, atomic_write_text, clean_orphans, locked

#: rcParams fixed by :func:`set_theme` (on top of seaborn's theme).
RC = {
    "svg.hashsalt": "mass-dpo",
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "font.family": "DejaVu Sans",
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "lines.linewidth": 1.6,
    "path.simplify": False,
}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
PNG_METADATA = {"Software": None}
SVG_METADATA = {"Date": None}
CSV_FLOAT_FORMAT = "%.10g"

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (no scipy needed); t_quantile beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def set_theme() -> None:
    """Colourblind-safe seaborn theme (``whitegrid``, ``colorblind`` palette) with the fixed :data:`RC`."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", rc=RC)


def palette(labels) -> dict:
    """Stable ``{label: colour}`` from seaborn's colourblind palette, in the order the labels are given."""
    colours = sns.color_palette("colorblind", max(len(labels), 1))
    return {label: colours[i % len(colours)] for i, label in enumerate(labels)}


def repo_root() -> Path:
    """The checkout holding the package (parent of ``mass_dpo/``)."""
    return Path(__file__).resolve().parents[1]


def resolve_out_dir(out_dir) -> Path:
    """An absolute ``out_dir`` as is; a relative one against the repository root (so a notebook writes to the same
    place whether JupyterLab runs it in ``notebooks/`` or papermill at the root). Created if missing."""
    path = Path(out_dir)
    if not path.is_absolute():
        path = repo_root() / path
    path.mkdir(parents=True, exist_ok=True)
    clean_orphans(path)  # temporaries of a killed save
    return path


def _write_csv(data: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        data.to_csv(tmp, index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n")


def save_csv(df: pd.DataFrame, name: str, out_dir) -> Path:
    """Write ``<out_dir>/<name>.csv`` (e.g. the raw per-seed records behind a figure). Returns the path."""
    path = resolve_out_dir(out_dir) / f"{name}.csv"
    _write_csv(df, path)
    return path


def figure_fingerprint(fig, data: pd.DataFrame) -> str:
    """sha256 of what a figure shows: its numbers (``data``), size, and every axes' texts, lines, bars and points.
    Two figures with the same fingerprint draw the same picture (the rendering itself is deterministic)."""
    import hashlib

    def ticks(axis):
        # automatic ticks follow from the limits, the scale and the layout (all hashed); only ticks set by hand
        # (a FixedLocator, labelled by any formatter) carry information of their own. Asking the axis for its tick
        # labels instead would lay every tick out, which costs as much as drawing.
        loc, fmt = axis.get_major_locator(), axis.get_major_formatter()
        locs = [float(x) for x in getattr(loc, "locs", ())]
        return type(loc).__name__, locs, type(fmt).__name__, list(fmt.format_ticks(locs)) if locs else []

    h = hashlib.sha256()
    h.update(data.to_csv(index=False).encode())
    engine = fig.get_layout_engine()
    h.update(repr((tuple(fig.get_size_inches()), fig.dpi, matplotlib.__version__, type(engine).__name__,
                   fig.subplotpars.left, fig.subplotpars.bottom, fig.subplotpars.right, fig.subplotpars.top,
                   sorted((k, repr(v)) for k, v in matplotlib.rcParams.items() if not k.startswith("backend")))).encode())
    for ax in fig.axes:
        h.update(repr((ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_xlim(), ax.get_ylim(),
                       ax.get_xscale(), ax.get_yscale(), ticks(ax.xaxis), ticks(ax.yaxis), len(ax.patches),
                       [(t.get_text(), t.get_position()) for t in ax.texts])).encode())
        for line in ax.get_lines():
            h.update(repr((line.get_color(), line.get_linestyle(), line.get_marker(), line.get_label())).encode())
            h.update(np.asarray(line.get_xydata(), dtype=float).tobytes())
        for patch in ax.patches:
            h.update(repr((patch.get_facecolor(), patch.get_bbox().bounds)).encode())
        for image in ax.images:
            h.update(np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan).tobytes())
            h.update(repr((image.get_cmap().name, image.norm.vmin, image.norm.vmax)).encode())
        for coll in ax.collections:
            h.update(np.asarray(coll.get_offsets(), dtype=float).tobytes())
            h.update(np.asarray(coll.get_facecolor(), dtype=float).tobytes())
        legend = ax.get_legend()
        if legend is not None:  # its texts and its requested place (matplotlib keeps that only as ``_loc``)
            h.update(repr(([t.get_text() for t in legend.get_texts()], getattr(legend, "_loc", None))).encode())
    for legend in fig.legends:
        h.update(repr(([t.get_text() for t in legend.get_texts()], getattr(legend, "_loc", None))).encode())
    h.update(repr([t.get_text() for t in fig.texts]).encode())
    return h.hexdigest()


def save_figure(fig, name: str, data: pd.DataFrame, out_dir) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.pdf``, ``.png`` and ``.csv`` (``data``: the plotted numbers) with deterministic bytes.

    When the PDF and PNG on disk were drawn from a figure with the same :func:`figure_fingerprint` (kept in
    ``<name>.fig.sha256``), they are left as they are and nothing is rendered: a warm rerun draws no figure twice
    (``MASS_DPO_REDRAW=1`` redraws anyway). The check and the writes hold the lock of ``<out_dir>/<name>``, so two
    processes writing one figure leave all its files from one of them. Returns ``{"pdf": path, "png": path, "csv":
    path}``.
    """
    import os

    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be the pandas DataFrame behind the figure, got {type(data).__name__}")
    out = resolve_out_dir(out_dir)
    paths = {"pdf": out / f"{name}.pdf", "png": out / f"{name}.png", "csv": out / f"{name}.csv"}
    stamp = out / f"{name}.fig.sha256"
    key = figure_fingerprint(fig, data)
    with locked(out / name, f"the figure {out / name}"):  # two writers of one figure: its files all from one
        fresh = (stamp.is_file() and stamp.read_text().strip() == key and paths["pdf"].is_file()
                 and paths["png"].is_file() and os.environ.get("MASS_DPO_REDRAW", "") in ("", "0"))
        if not fresh:
            if isinstance(fig.get_layout_engine(), matplotlib.layout_engine.ConstrainedLayoutEngine):
                # lay the figure out once and keep that layout: constrained layout run again at every save moves
                # the axes by a hair, and the second file would differ from the first
                fig.draw_without_rendering()
                fig.set_layout_engine("none")
            stamp.unlink(missing_ok=True)  # a kill between the two files below must not leave them stamped fresh
            with matplotlib.rc_context({"svg.hashsalt": RC["svg.hashsalt"]}):
                with atomic_path(paths["pdf"]) as tmp:
                    fig.savefig(tmp, format="pdf", metadata=PDF_METADATA)
                with atomic_path(paths["png"]) as tmp:
                    fig.savefig(tmp, format="png", metadata=PNG_METADATA)
            atomic_write_text(stamp, key + "\n")
        _write_csv(data, paths["csv"])
    fig._mass_dpo_png = paths["png"]  # show() displays this file instead of rendering again
    return paths


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table (no ``tabulate`` dependency); numbers right-aligned, floats to 4 significant digits."""
    cols = [str(c) for c in df.columns]
    rows = [[_cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    header = "| " + " | ".join(cols) + " |"
    rule = "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"
    body = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([header, rule, *body]) + "\n"


def save_table(df: pd.DataFrame, name: str, out_dir) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.csv``, ``.md`` (pipe table) and ``.tex`` (booktabs tabular), under the lock of
    ``<out_dir>/<name>`` (all three from one writer). Returns the paths."""
    out = resolve_out_dir(out_dir)
    paths = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "tex": out / f"{name}.tex"}
    tex = df.to_latex(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True)
    with locked(out / name, f"the table {out / name}"):  # two writers of one table: its three files all from one
        _write_csv(df, paths["csv"])
        atomic_write_text(paths["md"], to_markdown(df))
        atomic_write_text(paths["tex"], tex)
    return paths


def t_quantile(dof: int) -> float:
    """Two-sided 95% Student-t quantile for ``dof`` degrees of freedom: the table up to 30, above it the
    Cornish-Fisher expansion of t around the normal quantile z = 1.959964 (Abramowitz & Stegun 26.7.5, four terms;
    error below 1e-6 there)."""
    if dof < 1:
        return float("nan")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, k = 1.959963984540054, float(dof)
    return (z + (z**3 + z) / (4 * k) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * k**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * k**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * k**4))


def mean_ci(df: pd.DataFrame, by, value: str, *, band: str = "t") -> pd.DataFrame:
    """Mean of ``value`` over the rows of each ``by`` group (e.g. over seeds) with a t-based 95% interval
    (``band="t"``) or the range of the rows (``band="range"``: lowest to highest, the seeds themselves as a band,
    readable where two seeds make the t-interval 12.7 standard errors wide).

    Returns the ``by`` columns plus ``mean``, ``lo``, ``hi``, ``count``; one row (count 1) gives ``lo = hi = mean``.
    """
    if band not in ("t", "range"):
        raise ValueError(f"band must be 't' or 'range', got {band!r}")
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, grp in df.groupby(by, sort=True, dropna=False):
        vals = grp[value].to_numpy(dtype=float)
        vals = vals[np.isfinite(vals)]
        n = len(vals)
        mean = float(vals.mean()) if n else float("nan")
        half = t_quantile(n - 1) * float(vals.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        lo, hi = (float(vals.min()), float(vals.max())) if band == "range" and n else (mean - half, mean + half)
        key = key if isinstance(key, tuple) else (key,)
        rows.append(dict(zip(by, key), mean=mean, lo=lo, hi=hi, count=n))
    return pd.DataFrame(rows)


def paired_difference(df: pd.DataFrame, by, column: str, a, b, value: str, unit: str = "seed") -> pd.DataFrame:
    """Mean and 95% interval of ``value[a] - value[b]`` paired by ``unit``, within each ``by`` group.

    ``column`` names what ``a`` and ``b`` are (e.g. ``column="method"``); rows missing either side are dropped.
    Returns the ``by`` columns plus ``mean``, ``lo``, ``hi``, ``count`` (see :func:`mean_ci`).
    """
    by = [by] if isinstance(by, str) else list(by)
    wide = df[df[column].isin([a, b])].pivot_table(index=by + [unit], columns=column, values=value, aggfunc="first")
    wide = wide.dropna(subset=[a, b]).reset_index()
    wide["diff"] = wide[a] - wide[b]
    return mean_ci(wide, by, "diff")


def facet_lines(summary: pd.DataFrame, *, x: str, hue: str, col: str | None = None, row: str | None = None,
                hue_order=None, col_order=None, row_order=None, logx: bool = False, logy: bool = False,
                xlabel: str | None = None, ylabel: str | None = None, style: dict | None = None,
                panel_size=(3.4, 2.6), band: bool = True, sharex: bool | str = True):
    """One panel per (row, col); in each, a line per ``hue`` through ``mean`` with a shaded ``lo``-``hi`` band.

    ``style`` maps a hue value to extra ``Axes.plot`` keywords (e.g. ``{"random": {"linestyle": "--"}}``).
    ``sharex``: matplotlib's (``"col"``: each column its own x axis, shared down the column, e.g. one per dataset
    when their runs have different numbers of steps).
    Returns ``(fig, axes)`` with ``axes`` a 2-D array ``[rows, cols]``; a shared legend sits under the panels.
    """
    hue_order = list(hue_order) if hue_order is not None else list(dict.fromkeys(summary[hue]))
    col_order = [None] if col is None else (list(col_order) if col_order is not None
                                            else list(dict.fromkeys(summary[col])))
    row_order = [None] if row is None else (list(row_order) if row_order is not None
                                            else list(dict.fromkeys(summary[row])))
    colours = palette(hue_order)
    # constrained layout runs only when the figure is drawn, so a warm rerun that skips drawing (save_figure)
    # pays nothing for it
    fig, axes = plt.subplots(len(row_order), len(col_order), squeeze=False, sharex=sharex, layout="constrained",
                             figsize=(panel_size[0] * len(col_order), panel_size[1] * len(row_order)))
    for i, r in enumerate(row_order):
        for j, c in enumerate(col_order):
            ax = axes[i, j]
            sub = summary
            if row is not None:
                sub = sub[sub[row] == r]
            if col is not None:
                sub = sub[sub[col] == c]
            for h in hue_order:
                line = sub[sub[hue] == h].sort_values(x)
                if line.empty:
                    continue
                kw = dict(color=colours[h], marker="o", markersize=3, label=str(h))
                kw.update((style or {}).get(h, {}))
                ax.plot(line[x], line["mean"], **kw)
                if band and {"lo", "hi"} <= set(line.columns):
                    ax.fill_between(line[x], line["lo"], line["hi"], color=kw["color"], alpha=0.18, linewidth=0)
            title = " | ".join(str(v) for v in (r, c) if v is not None)
            if title:
                ax.set_title(title)
            if logx:
                ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            if i == len(row_order) - 1:
                ax.set_xlabel(xlabel or x)
            if j == 0:
                ax.set_ylabel(ylabel or "")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    return fig, axes


def annotated_heatmaps(cells: pd.DataFrame, *, xtick: str, ytick: str, xlabel: str, ylabel: str,
                       panel_size=(3.3, 3.0), cmap: str = "RdBu"):
    """A grid of heat maps with a number in every cell, e.g. :func:`mass_dpo.toy.regime_map_cells`.

    ``cells`` has one row per cell: ``i`` / ``j`` (the panel's row and column), ``y`` / ``x`` (the cell's position
    in it), ``gain`` (the colour, on ``-vmax..vmax`` with ``vmax`` per panel row), ``text`` (written in the cell,
    bold where ``significant``), ``title`` (per panel), ``row_label`` (beside ``ylabel`` on the first column) and
    the tick values ``xtick`` / ``ytick``. One colour bar per panel row. Returns ``(fig, axes)``, ``axes`` a 2-D array.
    """
    rows, cols = int(cells["i"].max()) + 1, int(cells["j"].max()) + 1
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(panel_size[0] * cols, panel_size[1] * rows),
                             layout="constrained")
    for i in range(rows):
        image = None
        for j in range(cols):
            ax, part = axes[i, j], cells[(cells["i"] == i) & (cells["j"] == j)]
            if part.empty:
                ax.set_visible(False)
                continue
            ny, nx = int(part["y"].max()) + 1, int(part["x"].max()) + 1
            grid = np.full((ny, nx), np.nan)
            grid[part["y"].astype(int), part["x"].astype(int)] = part["gain"].astype(float)
            vmax = float(part["vmax"].iloc[0])
            image = ax.imshow(grid, cmap=cmap, vmin=-vmax, vmax=vmax, origin="lower", aspect="auto")
            for r in part.itertuples():
                strong = math.isfinite(r.gain) and abs(r.gain) > 0.6 * vmax
                ax.text(r.x, r.y, r.text, ha="center", va="center", fontsize=6.5,
                        fontweight="bold" if r.significant else "normal", color="white" if strong else "black")
            xt = part.drop_duplicates("x").sort_values("x")
            yt = part.drop_duplicates("y").sort_values("y")
            ax.set_xticks(xt["x"].astype(int).tolist(), [f"{v:g}" for v in xt[xtick]])
            ax.set_yticks(yt["y"].astype(int).tolist(), [f"{v:g}" for v in yt[ytick]])
            ax.grid(False)
            ax.set_title(str(part["title"].iloc[0]), fontsize=8)
            if i == rows - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(f"{ylabel}\n{part['row_label'].iloc[0]}")
        if image is not None:
            fig.colorbar(image, ax=list(axes[i]), shrink=0.8)
    return fig, axes


def method_bars(summary: pd.DataFrame, metric: str, labels, *, ylabel: str):
    """One panel per dataset: each method's mean (bars, with its standard error) and the paper's number (black
    ticks), from a ``method_table`` summary (columns ``dataset, method, metric, value, se, paper``); the untrained
    ``reference`` in grey. Returns the figure and the rows it shows."""
    import matplotlib.pyplot as plt

    shown = summary[summary["metric"] == metric]
    datasets = [d for d in dict.fromkeys(shown["dataset"]) if d != "avg"]
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(3.2 * max(1, len(datasets)), 2.9), squeeze=False,
                             layout="constrained")
    colours = {**palette([lb for lb in labels if lb != "reference"]), "reference": "0.7"}
    for ax, ds in zip(axes[0], datasets):
        part = shown[shown["dataset"] == ds].set_index("method").reindex(list(labels))
        ax.bar(range(len(part)), part["value"], yerr=part["se"].fillna(0), color=[colours[m] for m in part.index])
        ax.scatter(range(len(part)), part["paper"], color="black", marker="_", s=200, label="paper", zorder=3)
        ax.set_xticks(range(len(part)), part.index, rotation=45, ha="right")
        ax.set_title(ds)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].legend(loc="best")  # the spot that hides the fewest bars and ticks
    return fig, shown


def show(fig) -> None:
    """Display ``fig`` once in a notebook as a PNG (whatever the matplotlib backend, ``Agg`` included) and close it."""
    import io

    saved = getattr(fig, "_mass_dpo_png", None)
    if saved is not None and Path(saved).is_file():
        png = Path(saved).read_bytes()
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata=PNG_METADATA)
        png = buf.getvalue()
    plt.close(fig)
    try:
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - plain Python without IPython
        return
    display(Image(data=png, format="png"))
