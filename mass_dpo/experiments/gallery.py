"""The gallery's claims table, written from the notebooks' own paired-difference tables (``papers_figures/claims.md``).

Every notebook that compares two methods saves the comparison as a table with the columns of
:func:`mass_dpo.experiments.core.paired_difference` (``a``, ``b``, ``diff``, ``lo``, ``hi``, ``significant``, ...);
the learning check saves :func:`~mass_dpo.experiments.core.learning_table`. :func:`write_claims` collects all of
them after a ``mass-dpo reproduce``, so the claims table always states the numbers of the run that made the figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .core import PERCENT, paper_order

PAIRED = {"a", "b", "diff", "lo", "hi", "significant"}
#: Notebooks in the order the gallery lists them.
ORDER = ("table1", "table2", "table5", "table6", "training_dynamics", "table3", "table4", "table7", "table8")


def _fmt(value: float, metric: str) -> str:
    return f"{100 * value:+.1f}" if metric in PERCENT else f"{value:+.3g}"


def drawn(folder, name: str) -> list[Path]:
    """The folders notebook ``name`` was drawn into under a gallery folder: ``name/``, then each ``name_<round>/`` (a
    dataset's round drawn on its own before it joins ``name/``, as ``lm/table1_medmcqa``), those that exist."""
    root = Path(folder)
    return [p for p in (root / name, *sorted(root.glob(f"{name}_*"))) if p.is_dir()]


def paired_tables(out_dir) -> list[tuple[str, pd.DataFrame]]:
    """``[(folder/file, table)]``: every saved CSV under ``out_dir`` with the paired-difference columns."""
    out = []
    for folder in (d for name in ORDER for d in drawn(out_dir, name)):
        for path in sorted(folder.glob("*.csv")):
            try:
                table = pd.read_csv(path)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                continue
            if PAIRED <= set(table.columns) and len(table):
                out.append((f"{folder.name}/{path.stem}", table))
    return out


#: The gallery's folders of each regime: the default profile's at its top, the LM regime's profile (``cpu-lm``) in ``lm/``.
REGIME_FOLDERS = ("", "lm")


#: Where a regime's answer to the claim is read, per dataset, first found first: Table 1's runs, else the Figures 2-3
#: runs (S-DPO and MASS-DPO only; a dataset whose Table 1 has not run yet: a long grid runs in rounds).
CLAIM_SOURCES = ("table1", "training_dynamics")


def _claim_source(folder) -> str | None:
    return next((s for s in CLAIM_SOURCES if any((d / "mass_dpo_minus_sdpo.csv").is_file() for d in drawn(folder, s))),
                None)


def regime_of(folder) -> str:
    """The regime (and model) a gallery folder's runs come from, read from its Table 1 runs (``table1/runs.csv``;
    else those of the first :data:`CLAIM_SOURCES` notebook that ran)."""
    path = next((d / "runs.csv" for s in CLAIM_SOURCES for d in drawn(folder, s) if (d / "runs.csv").is_file()), None)
    if path is None:
        return "?"
    runs = pd.read_csv(path)
    parts = [f"{m} {r}" for m, r in dict.fromkeys(zip(runs.get("model", ["?"]), runs.get("regime", ["?"])))]
    return ", ".join(parts)


#: What a regime's ``accuracy`` is (``runs.csv`` ``accuracy_kind``), as the claims table names it.
ACCURACY_KINDS = {"top1": "accuracy (top-1 of the pool)", "hit_ratio@1": "accuracy (generation HitRatio@1)"}


def _metric_name(folder, metric: str) -> str:
    """``metric`` as the claims table names it: ``accuracy`` says which accuracy the folder's Table 1 runs measured
    (the ranking's top-1 in the log-linear regime, greedy generation in the LM regimes)."""
    if metric != "accuracy":
        return metric
    path = next((d / "runs.csv" for s in CLAIM_SOURCES for d in drawn(folder, s) if (d / "runs.csv").is_file()), None)
    runs = pd.read_csv(path) if path is not None else pd.DataFrame()
    kinds = list(dict.fromkeys(runs.get("accuracy_kind", pd.Series(dtype=str)).dropna().astype(str)))
    return " / ".join(ACCURACY_KINDS.get(k, f"accuracy ({k})") for k in kinds) or metric


def _claim_rows(folder) -> list[tuple[str, pd.Series]]:
    """``[(source, row)]`` of a regime folder's ``mass_dpo_minus_sdpo.csv`` tables: each dataset's rows from the
    first of :data:`CLAIM_SOURCES` that ran it (the notebook's folder, then its rounds drawn on their own)."""
    out, seen = [], set()
    for path in (d / "mass_dpo_minus_sdpo.csv" for s in CLAIM_SOURCES for d in drawn(folder, s)):
        if not path.is_file():
            continue
        table = pd.read_csv(path)
        rows = table[~table["dataset"].isin(seen)]
        out += [(path.parent.name, r) for _, r in rows.iterrows()]
        seen |= set(table["dataset"])
    return out


def regime_claim(root) -> list[str]:
    """The answer to the paper's claim, one line per (regime, dataset, metric): MASS-DPO minus S-DPO at equal n per
    test prompt (``table1/mass_dpo_minus_sdpo.csv`` of each regime's folder; a dataset Table 1 has not run from the
    next of :data:`CLAIM_SOURCES` there), with its 95% interval."""
    lines = ["## The claim, per regime: MASS-DPO minus S-DPO at equal n", "",
             "| regime | source | dataset | metric | difference | 95% interval | seeds | test prompts | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    found = False
    for sub in REGIME_FOLDERS:
        folder = Path(root) / sub
        source = _claim_source(folder)
        if source is None:
            continue
        found = True
        regime = regime_of(folder)
        for source, r in _claim_rows(folder):
            verdict = ("above" if r["diff"] > 0 else "below") if bool(r["significant"]) else "inside the noise"
            lines.append(f"| {regime} | {'/'.join(p for p in (sub, source) if p)} | {r['dataset']} | "
                         f"{_metric_name(folder, r['metric'])} | "
                         f"{_fmt(r['diff'], r['metric'])} | "
                         f"{_fmt(r['lo'], r['metric'])} to {_fmt(r['hi'], r['metric'])} | {r.get('seeds', '')} | "
                         f"{r.get('prompts', '')} | {verdict} |")
    return lines + [""] if found else []


#: Where a regime's learning check is read, per dataset: every method of Table 1's runs, else of the tables that ran
#: (a dataset whose Table 1 has not run yet), first found first per (dataset, method).
LEARNING_SOURCES = {"table1": "Table 1", "table2": "Table 2", "table5": "Table 5", "table6": "Table 6",
                    "training_dynamics": "Figures 2-3"}


def learning_rows(folder) -> tuple[pd.DataFrame, list[str]]:
    """The MRR learning check of a regime's folder (each method against the untrained reference) and the names of
    the notebooks it comes from: each dataset from Table 1's ``learning.csv`` where Table 1 ran it (every method),
    else every (dataset, method) from the first :data:`LEARNING_SOURCES` one that ran it; rows by dataset, then
    method, in the paper's order."""
    found = [(name, pd.read_csv(d / "learning.csv")) for name in LEARNING_SOURCES for d in drawn(folder, name)
             if (d / "learning.csv").is_file()]
    if not found:
        return pd.DataFrame(), []
    table = pd.concat([t.assign(_source=name) for name, t in found], ignore_index=True)
    table = table[table["metric"] == "mrr"]
    in_table1 = set(table.loc[table["_source"] == "table1", "dataset"])
    table = table[(table["_source"] == "table1") | ~table["dataset"].isin(in_table1)]
    table = table.drop_duplicates(["dataset", "method"], keep="first")
    sources = [LEARNING_SOURCES[n] for n in dict.fromkeys(table["_source"])]
    return table.sort_values(["dataset", "method"], key=paper_order, kind="stable"), sources


#: The learning requirement per method: it learns (MRR z >= 3 against the untrained reference) on at least this
#: share of the datasets its regime ran (3 of 4).
LEARNING_QUORUM = 0.75


def learning_summary(table: pd.DataFrame) -> list[str]:
    """One line per method of a learning check (rows of :func:`learning_rows`): on how many of the datasets it ran
    it learned, and where it fell short (with its z), then whether every method meets :data:`LEARNING_QUORUM`."""
    lines, short = [], []
    for method, rows in table.groupby("method", sort=False):
        learned = rows[rows["learned"].astype(bool)]
        missed = rows[~rows["learned"].astype(bool)]
        need = math.ceil(LEARNING_QUORUM * len(rows))
        if len(learned) < need:
            short.append(f"{method} ({len(learned)} of {len(rows)})")
        lines.append(f"- {method}: learned on {len(learned)} of {len(rows)} dataset(s)"
                     + (f"; short on " + ", ".join(f"{r.dataset} (z {r.z_score:.2f})" for r in missed.itertuples())
                        if len(missed) else "") + ".")
    verdict = ("met by every method" if not short else "**not met** by " + ", ".join(short))
    n = table["dataset"].nunique()
    return lines + ["", f"Every method learns on at least {math.ceil(LEARNING_QUORUM * n)} of the {n} datasets "
                        f"({LEARNING_QUORUM:.0%}): {verdict}.", ""]


def _regime_sections(folder: Path, title: str) -> list[str]:
    lines = []
    lt, sources = learning_rows(folder)
    if sources:
        lines += [f"## {title}Learning first ({', '.join(sources)} runs): each method against the untrained "
                  "reference, MRR", "",
                  "| dataset | method | gain | 95% interval | z | learned (z >= 3) |", "|---|---|---|---|---|---|"]
        for r in lt.itertuples():
            lines.append(f"| {r.dataset} | {r.method} | {_fmt(r.diff, 'mrr')} | {_fmt(r.lo, 'mrr')} to "
                         f"{_fmt(r.hi, 'mrr')} | {r.z_score:.2f} | {'yes' if r.learned else 'no'} |")
        lines.append("")
        lines += learning_summary(lt.sort_values("method", key=paper_order, kind="stable"))
    for source, table in paired_tables(folder):
        if source.endswith("/learning"):
            continue
        extra = [c for c in table.columns if c not in PAIRED | {"model", "dataset", "metric", "se", "z_score", "seeds",
                                                                 "prompts", "method"} and table[c].nunique() > 1]
        lines += [f"## {title}`{source}`", "", "| " + " | ".join(["dataset", "metric", *extra, "a - b", "difference",
                                                                     "95% interval", "verdict"]) + " |",
                  "|" + "---|" * (6 + len(extra))]
        for _, r in table.iterrows():
            verdict = ("a above b" if r["diff"] > 0 else "a below b") if bool(r["significant"]) else "inside the noise"
            metric = str(r.get("metric", ""))
            lines.append("| " + " | ".join([str(r.get("dataset", "")), metric, *[str(r[c]) for c in extra],
                                            f"{r['a']} - {r['b']}", _fmt(r["diff"], metric),
                                            f"{_fmt(r['lo'], metric)} to {_fmt(r['hi'], metric)}", verdict]) + " |")
        sig = table[table["significant"].astype(bool)]
        lines += ["", f"{len(sig[sig['diff'] > 0])} above, {len(sig[sig['diff'] < 0])} below, "
                      f"{len(table) - len(sig)} inside the noise, of {len(table)}.", ""]
    return lines


#: The method tables whose runs the side-by-side table reads, first found first per (dataset, method).
TABLE_SOURCES = tuple(name for name in LEARNING_SOURCES if name.startswith("table"))


def regimes_side_by_side(root, metric: str = "mrr") -> pd.DataFrame:
    """``metric`` (mean over seeds) of every (dataset, method) that the method tables of at least two regime folders
    ran, one column per regime named by its model, regime and the score its test metrics rank by (``runs.csv``
    ``score``: ``smollm2 freeze (logp)``). Empty when fewer than two regimes have a method table."""
    columns = {}
    for sub in REGIME_FOLDERS:
        folder = Path(root) / sub
        found = [pd.read_csv(d / "runs.csv") for n in TABLE_SOURCES for d in drawn(folder, n)
                 if (d / "runs.csv").is_file()]
        if not found:
            continue
        runs = pd.concat(found, ignore_index=True)
        if metric not in runs:
            continue
        runs = runs.drop_duplicates([c for c in ("dataset", "label", "seed") if c in runs])
        regime = ", ".join(f"{m} {r}" for m, r in dict.fromkeys(zip(runs["model"], runs["regime"])))
        trained = runs[runs["label"] != "reference"]
        scores = "/".join(dict.fromkeys(trained["score"].dropna().astype(str))) if "score" in runs else "?"
        columns[f"{regime} ({scores})"] = runs.groupby(["dataset", "label"], sort=False)[metric].mean()
    if len(columns) < 2:
        return pd.DataFrame()
    return pd.concat(columns, axis=1, sort=False).dropna(how="any").rename_axis(["dataset", "label"]).reset_index()


def _side_by_side_section(root, metric: str = "mrr") -> list[str]:
    table = regimes_side_by_side(root, metric)
    if table.empty:
        return []
    regimes = [c for c in table.columns if c not in ("dataset", "label")]
    lines = [f"## The method tables side by side: {metric.upper()} (%) per regime", "",
             "Mean over seeds of the (dataset, method) cells that both regimes ran (Tables 1, 2, 5, 6); each column "
             "names in brackets the score its regime ranks the pool by.", "",
             "| dataset | method | " + " | ".join(regimes) + " |", "|---|---|" + "---|" * len(regimes)]
    for _, r in table.iterrows():
        lines.append(f"| {r['dataset']} | {r['label']} | " + " | ".join(f"{100 * r[c]:.1f}" for c in regimes) + " |")
    return lines + [""]


def claims_markdown(out_dir) -> str:
    """The claims table as Markdown: the answer per regime (:func:`regime_claim`), then, per regime folder of the
    gallery (:data:`REGIME_FOLDERS`), the learning check and each paired comparison, one row per (dataset, metric,
    setting) with the difference, its 95% interval and the verdict (percentage points for the ranking metrics)."""
    root = Path(out_dir)
    lines = ["# Claims, with paired intervals", "",
             "Written by `mass-dpo reproduce` from the notebooks' own tables (`mass_dpo.experiments.gallery`); "
             "differences per test prompt on the same prompts, averaged over seeds, 95% interval over prompts; "
             "ranking metrics in percentage points. Every section names the regime its runs come from.", ""]
    lines += regime_claim(root)
    lines += _side_by_side_section(root)
    for sub in REGIME_FOLDERS:
        folder = root / sub
        if sub and not folder.is_dir():
            continue
        title = f"[{regime_of(folder)}] " if _claim_source(folder) or (folder / "table1").is_dir() else \
            (f"[{sub}] " if sub else "")
        lines += _regime_sections(folder, title)
    return "\n".join(lines) + "\n"


def write_claims(out_dir) -> Path:
    """Write ``<out_dir>/claims.md`` (:func:`claims_markdown`)."""
    from ..files import atomic_write_text

    return atomic_write_text(Path(out_dir) / "claims.md", claims_markdown(out_dir))
