"""mass_dpo.plotting: deterministic files, tables without tabulate, the seed summaries."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mass_dpo import plotting  # noqa: E402


def _figure():
    plotting.set_theme()
    df = pd.DataFrame({"seed": [0, 1, 2] * 4, "n": [1] * 6 + [4] * 6, "method": (["a"] * 3 + ["b"] * 3) * 2,
                       "value": [1.0, 1.2, 0.9, 2.0, 2.1, 1.8, 0.5, 0.6, 0.4, 1.0, 1.1, 0.9]})
    summary = plotting.mean_ci(df, ["method", "n"], "value")
    fig, axes = plotting.facet_lines(summary, x="n", hue="method", logx=True, logy=True, ylabel="value")
    return fig, axes, summary


def test_save_figure_writes_identical_bytes_twice(tmp_path):
    fig, _, summary = _figure()
    first = plotting.save_figure(fig, "fig", summary, tmp_path / "a")
    second = plotting.save_figure(fig, "fig", summary, tmp_path / "b")
    plt.close(fig)
    assert set(first) == {"pdf", "png", "csv"}
    for kind in first:
        assert first[kind].stat().st_size > 0
        assert first[kind].read_bytes() == second[kind].read_bytes(), kind
    pdf = first["pdf"].read_bytes()
    assert b"CreationDate" not in pdf and b"ModDate" not in pdf
    assert b"Software" not in first["png"].read_bytes()[:200]
    assert pd.read_csv(first["csv"]).shape == summary.shape


def test_a_fresh_identical_figure_gives_identical_bytes(tmp_path):
    fig1, _, s1 = _figure()
    fig2, _, s2 = _figure()
    a = plotting.save_figure(fig1, "f", s1, tmp_path / "a")
    b = plotting.save_figure(fig2, "f", s2, tmp_path / "b")
    plt.close("all")
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)


def test_save_figure_needs_the_data_frame(tmp_path):
    fig, _, _ = _figure()
    with pytest.raises(TypeError, match="DataFrame"):
        plotting.save_figure(fig, "fig", [1, 2], tmp_path)
    plt.close(fig)


def test_theme_fixes_the_svg_hash_salt_and_colourblind_palette():
    plotting.set_theme()
    assert matplotlib.rcParams["svg.hashsalt"] == plotting.RC["svg.hashsalt"]
    import seaborn as sns

    colours = sns.color_palette("colorblind")
    assert plotting.palette(["x", "y"]) == {"x": colours[0], "y": colours[1]}


def test_save_table_markdown_and_latex(tmp_path):
    df = pd.DataFrame({"method": ["a|b", "c"], "err_star": [0.123456, float("nan")], "n": [1, 2]})
    paths = plotting.save_table(df, "tab", tmp_path)
    md = paths["md"].read_text().splitlines()
    assert md[0] == "| method | err_star | n |"
    assert md[1] == "|:---|---:|---:|"
    assert md[2] == "| a\\|b | 0.1235 | 1 |" and md[3] == "| c |  | 2 |"
    tex = paths["tex"].read_text()
    assert "\\toprule" in tex and "err\\_star" in tex
    assert pd.read_csv(paths["csv"]).shape == (2, 3)


def test_mean_ci_uses_the_t_interval():
    df = pd.DataFrame({"g": ["x"] * 4 + ["y"], "v": [1.0, 2.0, 3.0, 4.0, 7.0]})
    out = plotting.mean_ci(df, "g", "v").set_index("g")
    half = 3.182 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert out.loc["x", "mean"] == 2.5
    assert out.loc["x", "hi"] - 2.5 == pytest.approx(half)
    assert out.loc["y", "lo"] == out.loc["y", "hi"] == 7.0 and out.loc["y", "count"] == 1
    assert math.isnan(plotting.t_quantile(0)) and plotting.t_quantile(3) == 3.182


@pytest.mark.parametrize("dof, published", [(31, 2.039513), (40, 2.021075), (60, 2.000298), (120, 1.979930),
                                            (1000, 1.962339)])
def test_t_quantile_above_the_table_matches_published_quantiles(dof, published):
    """Student's t 0.975 quantiles (e.g. R's qt(0.975, dof)) to 6 decimals beyond the table's 30 degrees of freedom,
    where 1.96 made intervals up to 4% too narrow."""
    assert plotting.t_quantile(dof) == pytest.approx(published, abs=1e-6)


def test_mean_ci_range_band_spans_the_rows():
    df = pd.DataFrame({"g": ["x"] * 3 + ["y"], "v": [1.0, 4.0, 2.5, 7.0]})
    out = plotting.mean_ci(df, "g", "v", band="range").set_index("g")
    assert (out.loc["x", "lo"], out.loc["x", "mean"], out.loc["x", "hi"]) == (1.0, 2.5, 4.0)
    assert out.loc["y", "lo"] == out.loc["y", "hi"] == 7.0
    with pytest.raises(ValueError, match="band"):
        plotting.mean_ci(df, "g", "v", band="sd")


def test_paired_difference_pairs_by_seed():
    df = pd.DataFrame({"seed": [0, 0, 1, 1, 2], "method": ["a", "b", "a", "b", "a"], "v": [3.0, 1.0, 5.0, 2.0, 9.0]})
    df["grp"] = "all"
    out = plotting.paired_difference(df, "grp", "method", "a", "b", "v")
    assert out.loc[0, "mean"] == pytest.approx(2.5) and out.loc[0, "count"] == 2  # seed 2 has no "b"


def test_relative_out_dir_resolves_against_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = plotting.resolve_out_dir(tmp_path / "abs")
    assert path == tmp_path / "abs" and path.is_dir()
    assert plotting.repo_root().joinpath("mass_dpo", "plotting.py").is_file()


def test_show_displays_png(monkeypatch):
    shown = []
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig, _, _ = _figure()
    plotting.show(fig)
    assert len(shown) == 1 and shown[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def test_an_unchanged_figure_is_not_drawn_again(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd

    from mass_dpo import plotting

    def figure(y):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], y)
        ax.set_title("t")
        return fig

    data = pd.DataFrame({"y": [1, 2, 3]})
    paths = plotting.save_figure(figure([1, 2, 3]), "f", data, tmp_path)
    first = paths["png"].stat().st_mtime_ns
    calls = []
    def fake_savefig(self, fname, *a, **k):  # save_figure writes to a temporary name, then renames it
        calls.append(fname)
        Path(fname).write_bytes(b"")

    monkeypatch.setattr(plt.Figure, "savefig", fake_savefig)
    plotting.save_figure(figure([1, 2, 3]), "f", data, tmp_path)
    assert calls == [] and paths["png"].stat().st_mtime_ns == first  # same picture: nothing rendered
    plotting.save_figure(figure([1, 2, 4]), "f", data, tmp_path)
    assert len(calls) == 2  # a changed line redraws the PDF and the PNG
    monkeypatch.setenv("MASS_DPO_REDRAW", "1")
    plotting.save_figure(figure([1, 2, 4]), "f", data, tmp_path)
    assert len(calls) == 4
    monkeypatch.delenv("MASS_DPO_REDRAW")

    def killed_after_the_pdf(self, fname, *a, **k):  # the process dies between the PDF and the PNG
        if str(fname).endswith(".png") or ".png." in str(fname):
            raise KeyboardInterrupt
        Path(fname).write_bytes(b"new pdf")

    monkeypatch.setattr(plt.Figure, "savefig", killed_after_the_pdf)
    with pytest.raises(KeyboardInterrupt):
        plotting.save_figure(figure([1, 2, 5]), "f", data, tmp_path)
    monkeypatch.setattr(plt.Figure, "savefig", fake_savefig)
    plotting.save_figure(figure([1, 2, 4]), "f", data, tmp_path)  # the PDF on disk is [1, 2, 5]'s: not fresh
    assert len(calls) == 6


def _heatmap(labels=("a", "b"), loc="upper left", cell=1.0, note="x", layout="constrained"):
    fig, ax = plt.subplots(layout=layout)
    ax.imshow(np.array([[0.0, cell], [2.0, 3.0]]), cmap="RdBu", vmin=-3, vmax=3)
    ax.set_xticks([0, 1], list(labels))
    ax.text(0, 0, note)
    ax.plot([0, 1], [0, 1], label="line")
    ax.legend(loc=loc)
    return fig


@pytest.mark.parametrize("change", [dict(labels=("a", "c")), dict(loc="lower right"), dict(cell=1.5),
                                    dict(note="y"), dict(layout=None)])
def test_the_fingerprint_sees_what_the_figure_shows_without_laying_it_out(change):
    data = pd.DataFrame({"v": [1.0]})
    base = plotting.figure_fingerprint(_heatmap(), data)
    assert plotting.figure_fingerprint(_heatmap(), data) == base  # the same picture: the same key
    fig = _heatmap(**change)
    assert plotting.figure_fingerprint(fig, data) != base  # hand-set ticks, legend place, pixels, texts, layout
    assert fig.stale  # the fingerprint did not draw (or lay out) the figure
    plt.close("all")


def test_facet_lines_lays_out_only_when_drawn(monkeypatch):
    calls = []
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    original = ConstrainedLayoutEngine.execute
    monkeypatch.setattr(ConstrainedLayoutEngine, "execute", lambda self, fig: calls.append(1) or original(self, fig))
    fig, _, summary = _figure()
    plotting.figure_fingerprint(fig, summary)
    assert calls == []  # building and fingerprinting a figure costs no layout
    fig.canvas.draw()
    assert calls
    plt.close(fig)
