"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display).

Each ``*_figure(tables)`` returns a :class:`matplotlib.figure.Figure`; :func:`render_figures`
renders all of them to PNG bytes. Every figure exists even when there is nothing to plot (it then
says so), so a workflow can declare the PNGs as outputs unconditionally.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mergesweep.aggregate.leaderboard import (
    Tables, col, convergence_table, grid_selected_ids, map_fronts, ranked_points,
)

#: Okabe-Ito, colour-blind safe; methods get colours in sorted order so every figure agrees.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
DOMAIN_PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "<", ">", "h"]
DPI = 200
#: A figure of more than MANY_PANELS panels is drawn at LARGE_DPI: a third fewer pixels to draw
#: and store; the report shows it at the same size (from the PNG's resolution)
LARGE_DPI = 120
MANY_PANELS = 6
STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.edgecolor": "#444444",
    "savefig.facecolor": "white",
}

#: Bounds that keep every figure readable at any sweep size (what is left out is said in the
#: figure and in the report's caption, :func:`figure_notes`)
BARS_MAX = 12  # selected points in the bars figure
HEATMAP_MAX = 20  # selected points (rows) in the heatmap
SENSITIVITY_MAX = 12  # sweeps (panels) in the sensitivity figure
PARETO_MAX = 12  # domain pairs (panels) in the Pareto figure
PARETO_DENSE = 400  # above this many points per panel, smaller and lighter markers

FIGURES = {
    "bars": "Per-method normalised scores (test) with standard errors",
    "heatmap": "Method x domain normalised scores (test)",
    "sensitivity": "Hyperparameter sensitivity (mean normalised score)",
    "pareto": "Pareto fronts per pair of domains (test)",
}
#: Figures drawn only for a run with searches (outputs of the leaderboard only then:
#: :func:`mergesweep.aggregate.outputs.output_paths` with ``searches=True``)
SEARCH_FIGURES = {
    "search_convergence": "Search convergence (validation objective per generation)",
    "search_fronts": "MAP: predicted and measured Pareto fronts against the grid (validation)",
}
SEARCH_PANELS_MAX = 12  # searches (convergence) or (MAP search, suite pair) panels (fronts)


def method_colors(tables: Tables) -> dict[str, str]:
    """A colour per method label (searches' labels included), in sorted order."""
    labels = set(tables.leaderboard["method_label"].dropna())
    if tables.searches:
        labels |= {s["label"] for s in tables.searches}
    labels = sorted(labels)
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(labels)}


def _empty(fig: Figure | None, message: str) -> Figure:
    """A figure that says there is nothing to plot (the PNG must exist anyway)."""
    fig = Figure(figsize=(6.0, 2.0), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", color="#666666", fontsize=10)
    return fig


def _domains(r) -> set[str]:
    """The domains a row covers: its experts' (every skill for the base)."""
    d = r.get("domains")
    return set(json.loads(d)) if isinstance(d, str) else set()


def _selected(tables: Tables, limit: int | None = None) -> pd.DataFrame:
    """Each sweep's selected point, by rank. With ``limit`` and more points than that: the
    ``limit`` best by mean normalised test score (across merge tasks; ties by label)."""
    sel = ranked_points(tables).copy()
    sel = sel.sort_values(["rank", "sweep_label"], na_position="last", kind="stable")
    if limit is not None and len(sel) > limit:
        sel = sel.sort_values([col("norm", "test", "mean"), "sweep_label"], ascending=[False, True],
                              na_position="last", kind="stable").head(limit)
    return sel


def _n_selected(tables: Tables) -> int:
    """The number of method groups with a selected point (each sweep and each search)."""
    if not tables.searches:
        return int(tables.leaderboard["selected"].sum())
    return len(ranked_points(tables))


def figure_notes(tables: Tables) -> dict[str, str]:
    """What each figure leaves out when the sweep is larger than it shows (empty if nothing)."""
    notes = {}
    n = _n_selected(tables)
    if n > BARS_MAX:
        notes["bars"] = (f"Shown: the {BARS_MAX} selected points with the highest mean normalised test score, "
                         f"of {n}; every one is in the leaderboard.")
    if n > HEATMAP_MAX:
        notes["heatmap"] = (f"Shown: the {HEATMAP_MAX} selected points with the highest mean normalised test "
                            f"score, of {n}; every one is in the leaderboard.")
    sweeps = _sweeps(tables)
    if len(sweeps) > SENSITIVITY_MAX:
        notes["sensitivity"] = (f"Shown: {SENSITIVITY_MAX} of {len(sweeps)} sweeps: the best-ranked sweep of each "
                                "method first (by its selected point's mean normalised test score), then the "
                                "next best; every point is in the all-models table and leaderboard.parquet.")
    if len(tables.searches) > SEARCH_PANELS_MAX:
        notes["search_convergence"] = (f"Shown: the first {SEARCH_PANELS_MAX} of {len(tables.searches)} searches; "
                                       "every generation of every search is in the convergence table.")
    if tables.searches and len(map_fronts(tables)) > SEARCH_PANELS_MAX:
        notes["search_fronts"] = (f"Shown: the first {SEARCH_PANELS_MAX} of {len(map_fronts(tables))} (MAP search, "
                                  "suite pair) panels.")
    pairs = _pareto_pairs(tables)
    if len(pairs) > PARETO_MAX:
        notes["pareto"] = (f"Shown: {PARETO_MAX} of {len(pairs)} domain pairs (the first alphabetically); every "
                           "pair is in pareto.parquet.")
    return notes


def _base_row(tables: Tables) -> pd.Series | None:
    ref = tables.wide[tables.wide["role"] == "base"]
    return ref.iloc[0] if len(ref) == 1 else None


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------


def bars_figure(tables: Tables) -> Figure:
    """Grouped bars: for each method's selected point, the normalised test score per domain and
    their mean, with standard-error bars; a second panel shows held-out test scores against the
    base."""
    sel = _selected(tables, BARS_MAX)
    doms = tables.skills
    with_heldout = bool(tables.heldout)
    n = len(sel)
    width_main = min(11.0, max(3.6, 0.75 * n * (len(doms) + 1) / 3 + 1.6))
    labels = [_tick(r) for _, r in sel.iterrows()]
    rotate = max((len(lab) for lab in labels), default=0) > 16
    # many points: the held-out panel goes under the main one (same x, labels once) instead of
    # beside it, where its labels would overlap
    stacked = with_heldout and n > 6
    height = 3.1 + (0.6 if rotate else 0.0) + (1.9 if stacked else 0.0)
    fig = Figure(figsize=(width_main + (2.4 if with_heldout and not stacked else 0), height), dpi=DPI,
                 layout="constrained")
    if sel.empty or not doms:
        return _empty(fig, "no merged model has a selected point")
    if stacked:
        gs = fig.add_gridspec(2, 1, height_ratios=[3.0, 1.5])
        ax = fig.add_subplot(gs[0])
        axh = fig.add_subplot(gs[1], sharex=ax)
    elif with_heldout:
        gs = fig.add_gridspec(1, 2, width_ratios=[width_main, 2.4])
        ax, axh = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    else:
        ax, axh = fig.add_subplot(1, 1, 1), None
    series = [(d, col("norm", "test", d)) for d in doms] + [("mean", col("norm", "test", "mean"))]
    k = len(series)
    bw = 0.8 / k
    x = np.arange(n)
    own = [set(json.loads(d)) for d in sel["domains"]]
    for j, (name, c) in enumerate(series):
        # a merge's bars are its own domains (those its experts cover) and their mean
        mine = np.array([name == "mean" or name in o for o in own])
        vals = np.where(mine, sel[c].astype(float).to_numpy(), np.nan)
        errs = sel[c + "_stderr"].astype(float).to_numpy()
        color = "#333333" if name == "mean" else DOMAIN_PALETTE[j % len(DOMAIN_PALETTE)]
        pos = x - 0.4 + bw * (j + 0.5)
        ax.bar(pos[mine], np.nan_to_num(vals[mine]), bw * 0.92,
               yerr=np.where(np.isfinite(errs[mine]), errs[mine], 0),
               color=color, label=name, error_kw={"elinewidth": 0.8, "capsize": 1.8, "ecolor": "#222222"},
               hatch="//" if name == "mean" else None, edgecolor="white" if name != "mean" else "#333333",
               linewidth=0.0, alpha=1.0 if name != "mean" else 0.85)
        for p, v, m in zip(pos, vals, mine):
            if m and not np.isfinite(v):
                ax.text(p, 0.02, "error", rotation=90, ha="center", va="bottom", fontsize=6.5, color="#B00020")
    ax.axhline(1.0, color="#222222", lw=0.9, ls="--", zorder=0, label="expert (= 1)")
    base = _base_row(tables)
    if base is not None and np.isfinite(_num(base.get(col("norm", "test", "mean")))):
        ax.axhline(_num(base[col("norm", "test", "mean")]), color="#777777", lw=0.9, ls=":", zorder=0,
                   label="base (mean)")
    if stacked:
        ax.tick_params(labelbottom=False)
    elif rotate:
        ax.set_xticks(x, labels, rotation=25, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, n - 0.4)
    top = np.nanmax([sel[c].astype(float).max() + sel[c + "_stderr"].astype(float).fillna(0).max()
                     for _, c in series] + [1.0])
    ax.set_ylim(0, max(1.12, top * 1.08))
    ax.set_ylabel("normalised score")
    total = _n_selected(tables)
    ax.set_title("Selected point of each method: merged ÷ expert, test split"
                 + (f"\n(the {n} best of {total} selected points)" if total > n else ""), loc="left")
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, ncols=k + 2, loc="outside lower left", frameon=False, handlelength=1.6,
               columnspacing=1.0)
    ax.grid(axis="x", visible=False)

    if axh is not None:
        hs = tables.heldout
        colors = method_colors(tables)
        hb = 0.8 / len(hs)
        for j, h in enumerate(hs):
            c = col("abs", "test", h)
            vals = sel[c].astype(float).to_numpy()
            errs = sel[c + "_stderr"].astype(float).fillna(0).to_numpy()
            pos = x - 0.4 + hb * (j + 0.5)
            ax_colors = [colors.get(m, "#777777") for m in sel["method_label"]]
            axh.bar(pos, np.nan_to_num(vals), hb * 0.9, yerr=errs, color=ax_colors,
                    error_kw={"elinewidth": 0.8, "capsize": 1.8}, alpha=1.0 - 0.35 * j)
            for p_, v in zip(pos, vals):
                if not np.isfinite(v):
                    axh.text(p_, 0.02, "error", rotation=90, ha="center", va="bottom", fontsize=6.5, color="#B00020")
            if base is not None and np.isfinite(_num(base.get(c))):
                axh.axhline(_num(base[c]), color="#777777", lw=0.9, ls=":", zorder=0,
                            label="base" if j == 0 else None)
        axh.set_xticks(x, labels, rotation=25 if stacked else 35, ha="right", rotation_mode="anchor")
        axh.set_xlim(-0.6, n - 0.4)
        axh.set_ylim(0, 1.0)
        axh.set_ylabel(f"{', '.join(hs)} ({', '.join(tables.metrics.get(h, '?') for h in hs)})")
        axh.set_title("Held-out, test", loc="left")
        if axh.get_legend_handles_labels()[0]:
            axh.legend(loc="upper right", frameon=False)
        axh.grid(axis="x", visible=False)
    return fig


def _tick(r: pd.Series) -> str:
    return str(r["sweep_label"])


def heatmap_figure(tables: Tables) -> Figure:
    """Rows: each method's selected point (ranked) and the base; columns: domains and the mean;
    cells: normalised test score, annotated."""
    sel = _selected(tables, HEATMAP_MAX)
    doms = tables.skills
    cols = [col("norm", "test", d) for d in doms] + [col("norm", "test", "mean")]
    rows = [(str(r["sweep_label"]), r) for _, r in sel.iterrows()]
    base = _base_row(tables)
    if base is not None:
        rows.append(("base", base))
    label_in = 0.075 * max((len(name) for name, _ in rows), default=4)
    fig = Figure(figsize=(0.5 + label_in + 0.95 * len(cols) + 0.9, 0.9 + 0.36 * max(len(rows), 1)), dpi=DPI,
                 layout="constrained")
    if sel.empty or not doms:
        return _empty(fig, "no merged model has a selected point")
    data = np.array([[_num(r.get(c)) for c in cols] for _, r in rows], dtype=float)
    # cells outside a merge's own domains (its experts') are shown greyed, in parentheses
    own = np.array([[c == cols[-1] or d in _domains(r) for d, c in zip(doms + ["mean"], cols)]
                    for _, r in rows])
    ax = fig.add_subplot(1, 1, 1)
    shown = np.where(own, data, np.nan)
    vmax = max(1.0, float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0)
    from matplotlib import colormaps

    cmap = colormaps["YlGnBu"].with_extremes(bad="#f0f0f0")
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    for i, (_, r) in enumerate(rows):
        failed = set((r.get("failed_suites") or "").split(",")) if isinstance(r.get("failed_suites"), str) else set()
        for j, c in enumerate(cols):
            v = data[i, j]
            if not own[i, j]:
                txt, color = (f"({v:.2f})" if np.isfinite(v) else ""), "#999999"
            elif np.isfinite(v):
                txt, color = f"{v:.2f}", "white" if v > 0.62 * vmax else "#111111"
            else:
                txt, color = ("error" if (j < len(doms) and doms[j] in failed) or failed else "n/a"), "#B00020"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(cols)), doms + ["mean"])
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.tick_params(length=0)
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    if base is not None:
        ax.axhline(len(rows) - 1.5, color="white", lw=3)
    ax.axvline(len(doms) - 0.5, color="white", lw=3)
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label("normalised score", fontsize=7.5)
    cb.outline.set_visible(False)
    total = _n_selected(tables)
    ax.set_title("Normalised test score (selected point per method)"
                 + (f"\n(the {len(sel)} best of {total} selected points)" if total > len(sel) else ""), loc="left")
    return fig


_SWEEPS: dict[int, list] = {}


def _sweeps(tables: Tables) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """Sweeps with more than one point, with the hyperparameters that vary in them (computed once
    per leaderboard). A merge only a search planned is no point of a sweep."""
    lb = tables.leaderboard
    cached = _SWEEPS.get(id(lb))
    if cached is not None and cached[0] is lb:
        return cached[1]
    out = []
    if tables.search_only:  # a merge only a search planned is no point of its method's sweep
        lb = lb[~lb["model_id"].isin(tables.search_only)]
    keys = lb[["method", "align", "base", "experts"]].astype(object).fillna("")
    by = [keys[c] for c in keys.columns]
    hp_text = lb[tables.hp_columns].astype(str) if tables.hp_columns else pd.DataFrame(index=lb.index)
    counts = hp_text.groupby(by, sort=True).nunique(dropna=False) if tables.hp_columns else None
    varying = ({key: [h for h, n in zip(tables.hp_columns, row) if n > 1]
                for key, row in zip(counts.index, counts.to_numpy())} if counts is not None else {})
    for key, g in lb.groupby(by, sort=True):
        if len(g) < 2:
            continue
        vary = varying.get(key, [])
        if not vary:
            continue
        out.append((str(g["sweep_label"].iloc[0]), g, vary))
    _SWEEPS.clear()
    _SWEEPS[id(tables.leaderboard)] = (tables.leaderboard, out)
    return out


def _fixed_grid(fig: Figure, nrows: int, ncols: int, *, top: float, bottom: float, left: float, right: float, hgap: float,
                wgap: float) -> dict:
    """Subplot spacing from margins and gaps in inches: a many-panel figure is laid out by hand
    (constrained layout would double its drawing time at sweep scale)."""
    w, h = fig.get_size_inches()
    return {"left": left / w, "right": 1 - right / w, "top": 1 - top / h, "bottom": bottom / h,
            "hspace": hgap / max(0.5, (h - top - bottom - hgap * (nrows - 1)) / nrows),
            "wspace": wgap / max(0.5, (w - left - right - wgap * (ncols - 1)) / ncols)}


def _chosen_sweeps(tables: Tables, limit: int = SENSITIVITY_MAX) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """At most ``limit`` sweeps: all of them when they fit; else the best-ranked sweep of each
    method (by its selected point's mean normalised test score) first, then the next best."""
    sweeps = _sweeps(tables)
    if len(sweeps) <= limit:
        return sweeps
    test = col("norm", "test", "mean")

    scores = {}
    for sw in sweeps:
        v = sw[1].loc[_grid_selected(tables, sw[1]), test].to_numpy(dtype=float)
        scores[id(sw)] = float(v[0]) if len(v) and np.isfinite(v[0]) else -math.inf

    def score(sw) -> float:
        return scores[id(sw)]

    ranked = sorted(sweeps, key=lambda sw: (-score(sw), sw[0]))
    chosen, methods = [], set()
    for sw in ranked:  # one per method first
        m = str(sw[1]["method_label"].iloc[0])
        if m not in methods:
            methods.add(m)
            chosen.append(sw)
    chosen = chosen[:limit]
    chosen += [sw for sw in ranked if not any(sw is c for c in chosen)][: limit - len(chosen)]
    return sorted(chosen, key=lambda sw: (-score(sw), sw[0]))


def _panel_title(label: str, detail: str, width: int = 44) -> str:
    """A panel title that fits its panel: the method on the first line, the expert set (wrapped)
    and the detail below."""
    method, _, rest = label.partition(" [")
    lines = [method]
    if rest:
        lines += textwrap.wrap("[" + rest, width) or []
    lines.append(detail)
    return "\n".join(lines)


def sensitivity_figure(tables: Tables) -> Figure:
    """One panel per sweep (at most :data:`SENSITIVITY_MAX`, :func:`_chosen_sweeps`): mean
    normalised score against the first varying hyperparameter, one line per combination of the
    others; validation solid (the selection criterion), test dashed; the selected point starred."""
    sweeps = _chosen_sweeps(tables)
    ncols = min(3, max(len(sweeps), 1))
    nrows = max(1, math.ceil(len(sweeps) / ncols))
    many = len(sweeps) > MANY_PANELS
    fig = Figure(figsize=(3.3 * ncols + 0.3, 2.9 * nrows + 0.5 + (0.5 if many else 0)), dpi=LARGE_DPI if many else DPI,
                 layout=None if many else "constrained")
    if not sweeps:
        return _empty(fig, "no method was run with more than one hyperparameter point")
    axes = fig.subplots(nrows, ncols, squeeze=False,
                        gridspec_kw=_fixed_grid(fig, nrows, ncols, top=0.62, bottom=0.75, left=0.6, right=0.15, hgap=1.05, wgap=0.7)
                        if many else None)
    val, test = col("norm", "validation", "mean"), col("norm", "test", "mean")
    for ax, (label, g, vary) in zip(axes.flat, sweeps):
        xh, others = _pick_x(g, vary)
        numeric = pd.api.types.is_float_dtype(g[xh])
        if numeric:
            xs_all = sorted(g[xh].dropna().unique())
            xpos = {v: v for v in xs_all}
        else:
            xs_all = sorted(g[xh].dropna().astype(str).unique())
            xpos = {v: i for i, v in enumerate(xs_all)}
        combos = g.groupby([g[o].astype(str) for o in others], sort=True) if others else [((), g)]
        for i, (key, gg) in enumerate(combos):
            colr = PALETTE[i % len(PALETTE)]
            gg = gg.assign(_x=[xpos.get(v if numeric else str(v), np.nan) for v in gg[xh]]).sort_values("_x")
            key = key if isinstance(key, tuple) else (key,)
            name = ", ".join(f"{o[3:]}={k}" for o, k in zip(others, key)) if others else "validation"
            ax.plot(gg["_x"], gg[val], "-", marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.4, color=colr,
                    label=name)
            ax.plot(gg["_x"], gg[test], "--", marker=MARKERS[i % len(MARKERS)], ms=3, lw=1.0, color=colr,
                    alpha=0.55, mfc="white")
            bad = gg[gg[val].isna()]
            for xv in bad["_x"]:
                ax.plot([xv], [0.02], marker="x", color="#B00020", ms=6, mew=1.5, transform=ax.get_xaxis_transform())
        s = g[_grid_selected(tables, g)]
        if len(s):
            sx = xpos.get(s[xh].iloc[0] if numeric else str(s[xh].iloc[0]), np.nan)
            ax.plot([sx], [s[val].iloc[0]], marker="*", ms=13, color="#FFD700", mec="#222222", mew=0.8,
                    zorder=5, ls="none")
        if not numeric:
            ax.set_xticks(range(len(xs_all)), xs_all, rotation=20)
        ax.set_xlabel(xh[3:])
        ax.set_ylabel("mean normalised score")
        n_fail = int((g["status"] == "error").sum())
        ax.set_title(_panel_title(label, f"{len(g)} points" + (f", {n_fail} failed" if n_fail else "")),
                     loc="left", fontsize=7.5)
        ax.axhline(1.0, color="#999999", lw=0.7, ls=":", zorder=0)
        if others:
            handles, names = ax.get_legend_handles_labels()
            keep = min(len(handles), 6)
            ax.legend(handles[:keep], names[:keep] if keep == len(handles) else [*names[:keep - 1], "…"],
                      loc="best", frameon=False, fontsize=6, handlelength=1.2, labelspacing=0.2,
                      ncols=2 if keep > 3 else 1, columnspacing=0.8)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    handles = [Line2D([], [], color="#444444", ls="-", marker="o", ms=4, label="validation (selects)"),
               Line2D([], [], color="#444444", ls="--", marker="o", ms=3, mfc="white", alpha=0.6,
                      label="test (reported)"),
               Line2D([], [], color="#FFD700", mec="#222222", marker="*", ms=11, ls="none", label="selected"),
               Line2D([], [], color="#B00020", marker="x", ms=6, ls="none", label="failed evaluation")]
    fig.legend(handles=handles, loc="lower center" if many else "outside lower center", ncols=4, frameon=False)
    return fig


def _grid_selected(tables: Tables, g: pd.DataFrame) -> np.ndarray:
    """Which rows of a sweep its own selection chose (``selected``, without searches; with
    them a grid point that only a search's selection chose is not starred)."""
    if not tables.searches:
        return g["selected"].to_numpy(dtype=bool)
    return g["model_id"].isin(grid_selected_ids(tables)).to_numpy(dtype=bool)


def _pick_x(g: pd.DataFrame, vary: list[str]) -> tuple[str, list[str]]:
    """x axis: the numeric varying hyperparameter with the most values (then by name)."""
    numeric = [h for h in vary if pd.api.types.is_float_dtype(g[h])]
    pool = numeric or vary
    xh = sorted(pool, key=lambda h: (-g[h].nunique(), h))[0]
    return xh, [h for h in vary if h != xh]


def _pareto_pairs(tables: Tables) -> list[tuple[str, str]]:
    pts = tables.pareto[tables.pareto["split"] == "test"] if not tables.pareto.empty else tables.pareto
    return list(dict.fromkeys(zip(pts["domain_x"], pts["domain_y"]))) if len(pts) else []


def pareto_figure(tables: Tables) -> Figure:
    """One panel per pair of domains (at most :data:`PARETO_MAX`): every merged model's
    normalised test scores, the Pareto front as a staircase, selected points outlined, experts
    and the base as references."""
    pts = tables.pareto[tables.pareto["split"] == "test"] if not tables.pareto.empty else tables.pareto
    pairs = _pareto_pairs(tables)[:PARETO_MAX]
    ncols = min(3, max(len(pairs), 1))
    nrows = max(1, math.ceil(len(pairs) / ncols))
    many = len(pairs) > MANY_PANELS
    fig = Figure(figsize=(2.9 * ncols + 0.3, 2.75 * nrows + 0.45 + (0.5 if many else 0)), dpi=LARGE_DPI if many else DPI,
                 layout=None if many else "constrained")
    if not pairs:
        return _empty(fig, "fewer than two domains with complete scores: no Pareto front")
    colors = method_colors(tables)
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(colors)}
    axes = fig.subplots(nrows, ncols, squeeze=False,
                        gridspec_kw=_fixed_grid(fig, nrows, ncols, top=0.3, bottom=1.05, left=0.55, right=0.1, hgap=0.75, wgap=0.75)
                        if many else None)
    refs = tables.references
    for ax, (dx, dy) in zip(axes.flat, pairs):
        p = pts[(pts["domain_x"] == dx) & (pts["domain_y"] == dy)]
        dense = len(p) > PARETO_DENSE
        for m, g in p.groupby("method_label", sort=True):
            ax.scatter(g["x"], g["y"], s=6 if dense else 22, color=colors.get(m, "#777"), marker=markers.get(m, "o"),
                       alpha=0.45 if dense else 0.85, linewidths=0, zorder=3, rasterized=dense)
            s = g[g["selected"]]
            ax.scatter(s["x"], s["y"], s=24 if dense else 60, facecolors="none", edgecolors="#111111",
                       linewidths=0.6 if dense else 1.1, marker=markers.get(m, "o"), zorder=4)
        f = p[p["on_front"]].sort_values(["x", "y"], ascending=[False, True])
        if len(f):
            fx, fy = f["x"].to_numpy(), f["y"].to_numpy()
            sx, sy = [fx[0]], [0.0]
            for xi, yi in zip(fx, fy):
                sx += [xi, xi]
                sy += [sy[-1], yi]
            sx.append(0.0)
            sy.append(sy[-1])
            ax.plot(sx[1:], sy[1:], color="#222222", lw=1.0, ls="-", drawstyle="default", zorder=2, alpha=0.8)
        labels: dict[tuple[float, float], list[str]] = {}
        for _, r in refs.iterrows():
            x, y = _num(r.get(col("norm", "test", dx))), _num(r.get(col("norm", "test", dy)))
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            is_base = r["role"] == "base"
            ax.scatter([x], [y], marker="o" if is_base else "X", s=40 if is_base else 34,
                       color="#9a9a9a" if is_base else "#222222", zorder=4 if is_base else 5, linewidths=0)
            if is_base or r["domain"] in (dx, dy):  # the other experts unlabelled: they crowd the origin
                labels.setdefault((round(x, 6), round(y, 6)), []).append(
                    "base" if is_base else f"{r['domain']} expert")
        lim = max(1.1, float(np.nanmax([p["x"].max(), p["y"].max(), 1.0])) * 1.05)
        for (x, y), names in labels.items():
            right = x > 0.6 * lim  # a label near the right edge goes left of its point, inside the panel
            ax.annotate(" / ".join(names), (x, y), xytext=(-4 if right else 4, 3), textcoords="offset points",
                        fontsize=6.5, color="#444444", ha="right" if right else "left")
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_aspect("equal", adjustable="box")
        ax.axvline(1.0, color="#bbbbbb", lw=0.6, ls=":")
        ax.axhline(1.0, color="#bbbbbb", lw=0.6, ls=":")
        ax.set_xlabel(f"normalised {dx} (test)")
        ax.set_ylabel(f"normalised {dy} (test)")
        ax.set_title(f"{dx} vs {dy}", loc="left")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles = [Line2D([], [], color=c, marker=markers[m], ls="none", ms=5, label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color="#111111", marker="o", mfc="none", ls="none", ms=7, label="selected"),
                Line2D([], [], color="#222222", lw=1.0, label="Pareto front"),
                Line2D([], [], color="#222222", marker="X", ls="none", ms=6, label="expert"),
                Line2D([], [], color="#9a9a9a", marker="o", ls="none", ms=5, label="base")]
    fig.legend(handles=handles, loc="lower center" if many else "outside lower center", ncols=min(len(handles), 6),
               frameon=False)
    return fig


def convergence_figure(tables: Tables) -> Figure:
    """One panel per search (at most :data:`SEARCH_PANELS_MAX`): the best validation objective
    among each generation's candidates (markers) and the best so far (a step line), the
    search's own objective as its result.json records it (:func:`convergence_table`)."""
    conv = convergence_table(tables)
    labels = [s["label"] for s in tables.searches][:SEARCH_PANELS_MAX]
    ncols = min(3, max(len(labels), 1))
    nrows = max(1, math.ceil(len(labels) / ncols))
    fig = Figure(figsize=(3.3 * ncols + 0.3, 2.6 * nrows + 0.5), dpi=DPI, layout="constrained")
    if not labels or conv.empty:
        return _empty(fig, "no search evaluated a generation")
    colors = method_colors(tables)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, label in zip(axes.flat, labels):
        c = conv[conv["search"] == label].sort_values("generation")
        color = colors.get(label, "#0072B2")
        ax.plot(c["generation"], c["best"], "o", ms=4, color=color, label="best of the generation")
        ax.step(c["generation"], c["best_so_far"], where="post", lw=1.4, color="#222222", label="best so far")
        search = next(x for x in tables.searches if x["label"] == label)
        ax.set_title(_panel_title(label, f"{search['strategy']}, {len(search['candidates'])} evaluations"),
                     loc="left", fontsize=7.5)
        ax.set_xlabel("generation")
        ax.set_ylabel("validation objective")
        gens = c["generation"].dropna().astype(int).tolist()
        if gens:
            ax.set_xticks(sorted(set(gens)) if len(set(gens)) <= 12 else ax.get_xticks())
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    handles = [Line2D([], [], color="#444444", marker="o", ls="none", ms=4, label="best of the generation"),
               Line2D([], [], color="#222222", lw=1.4, label="best so far")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    return fig


def search_fronts_figure(tables: Tables) -> Figure:
    """One panel per MAP search and pair of its objective suites (at most
    :data:`SEARCH_PANELS_MAX`), on raw validation scores (as MAP fits them): the surrogates'
    predicted Pareto front (line), the front points MAP evaluated (their measured scores, filled
    diamonds), and the grid merges of the same method, base and experts (grey dots; their
    Pareto front as a staircase)."""
    panels = map_fronts(tables)[:SEARCH_PANELS_MAX]
    ncols = min(3, max(len(panels), 1))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(3.0 * ncols + 0.3, 2.9 * nrows + 0.5), dpi=DPI, layout="constrained")
    if not panels:
        return _empty(fig, "no MAP search with a predicted front")
    colors = method_colors(tables)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, p in zip(axes.flat, panels):
        color = colors.get(p["search"], "#0072B2")
        pred = sorted(p["predicted"])
        if pred:
            ax.plot([a for a, _ in pred], [b for _, b in pred], "-", lw=1.3, color=color, alpha=0.9, zorder=3)
        g = p["grid"]
        ok = np.isfinite(g["x"]) & np.isfinite(g["y"])
        ax.scatter(g["x"][ok], g["y"][ok], s=16, color="#9a9a9a", linewidths=0, zorder=2)
        on = ok & g["on_front"]
        if on.any():
            order = np.argsort(-g["x"][on])
            fx, fy = g["x"][on][order], g["y"][on][order]
            sx, sy = [], []
            for i, (xi, yi) in enumerate(zip(fx, fy)):
                if i:
                    sx.append(xi)
                    sy.append(sy[-1])
                sx.append(xi)
                sy.append(yi)
            ax.plot(sx, sy, color="#555555", lw=0.9, ls="--", zorder=2)
        m = p["measured"]
        okm = np.isfinite(m["x"]) & np.isfinite(m["y"])
        ax.scatter(m["x"][okm], m["y"][okm], s=34, marker="D", color=color, edgecolors="#111111", linewidths=0.7,
                   zorder=4)
        ax.set_xlabel(f"{p['x']} (validation)")
        ax.set_ylabel(f"{p['y']} (validation)")
        ax.set_title(_panel_title(p["search"], f"{p['x']} vs {p['y']}"), loc="left", fontsize=7.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # one search: its colour; several: each panel in its search's colour, the legend neutral
    labels = {p["search"] for p in panels}
    key = colors.get(next(iter(labels)), "#0072B2") if len(labels) == 1 else "#444444"
    handles = [Line2D([], [], color=key, lw=1.3, label="predicted front (surrogates)"),
               Line2D([], [], color=key, marker="D", mec="#111111", ls="none", ms=5, label="measured front points"),
               Line2D([], [], color="#9a9a9a", marker="o", ls="none", ms=4, label="grid merges"),
               Line2D([], [], color="#555555", lw=0.9, ls="--", label="grid front")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4 if ncols > 1 else 2, frameon=False)
    return fig


SEARCH_BUILDERS: dict[str, Callable[[Tables], Figure]] = {
    "search_convergence": convergence_figure,
    "search_fronts": search_fronts_figure,
}


BUILDERS: dict[str, Callable[[Tables], Figure]] = {
    "bars": bars_figure,
    "heatmap": heatmap_figure,
    "sensitivity": sensitivity_figure,
    "pareto": pareto_figure,
}


#: A PNG larger than this (a figure of a big sweep: thousands of points, a dozen panels) is stored
#: with a 256-colour palette, about a third of the size; smaller figures stay full colour.
PALETTE_ABOVE = 300_000


def render_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi="figure", metadata={"Software": None})
    png = buf.getvalue()
    if len(png) <= PALETTE_ABOVE:
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        small, format="PNG", dpi=image.info.get("dpi", (DPI, DPI)))
    return small.getvalue() if small.tell() < len(png) else png


def render_figures(tables: Tables) -> dict[str, bytes]:
    """PNG bytes of every figure in :data:`FIGURES` (and, for a run with searches, of
    :data:`SEARCH_FIGURES`), rendered under the house style."""
    from matplotlib import rc_context

    out = {}
    with rc_context(STYLE):
        for name in FIGURES:
            out[name] = render_png(BUILDERS[name](tables))
        if tables.searches:
            for name in SEARCH_FIGURES:
                out[name] = render_png(SEARCH_BUILDERS[name](tables))
    return out
