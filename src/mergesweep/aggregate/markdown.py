"""``results/leaderboard.md``: the ranked table, references, selection and failures as GitHub
markdown, ready to paste into a README or a paper draft."""

from __future__ import annotations

from mergesweep.aggregate import views as V
from mergesweep.aggregate.leaderboard import Tables


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(view: V.View, bold_best: bool = True) -> str:
    """A GitHub-flavoured markdown table; numeric columns right-aligned, best values bold."""
    if not view.rows:
        return "_(none)_\n"
    numeric = [all(r[i].numeric for r in view.rows) for i in range(len(view.headers))]
    lines = ["| " + " | ".join(_escape(h) for h in view.headers) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for row in view.rows:
        cells = []
        for c in row:
            t = _escape(c.full)
            if c.best and bold_best:
                t = f"**{t}**"
            elif c.error:
                t = f"_{t}_"
            cells.append(t)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(t: Tables, provenance: dict | None = None, report_href: str = "report/report.html") -> str:
    s = V.summary(t)
    prov = provenance or {}
    out = ["# mergesweep leaderboard", ""]
    reverted = f"{s['n_reverted']} reverted, " if s["n_reverted"] else ""
    run = [f"{s['n_models']} models ({s['n_base']} base, {s['n_experts']} experts, {s['n_merged']} merged, "
           f"{reverted}{s['n_methods']} methods"
           + (f", {s['n_searches']} of them searches)" if s["n_searches"] else ")"),
           "skills: " + (", ".join(s["skills"]) or "–"),
           "held-out: " + (", ".join(s["heldout"]) or "–")]
    if prov.get("config_hash"):
        run.insert(0, f"config `{prov['config_hash']}`")
    out += [" · ".join(run), ""]
    if s["n_failed"] or s["n_missing"]:
        out += [f"> **{s['n_failed']} failed and {s['n_missing']} missing evaluation(s)**: the affected "
                "scores are marked _error_ below and listed under *Failed evaluations*.", ""]
    metric_list = ", ".join(f"{q}: {m}" for q, m in sorted(s["metrics"].items()))
    out += [f"Scores are on the **test** split; metric per suite: {metric_list}. "
            "*norm.* = merged ÷ the domain's expert on the domain's suite (1 = expert level). "
            "Δ = merged − base on a held-out suite (negative = forgetting). "
            "± is one standard error. Best value per column in bold.", ""]
    out += [f"**Selection rule.** {V.SELECTION_RULE}", ""]
    for v in V.leaderboard_views(t):
        out += [f"## {v.title}", "", table(v)]
        if v.note:
            out += [f"_{v.note}_", ""]
    rv = V.reversible_view(t)
    if rv.rows:
        out += [f"## {rv.title}", "", table(rv, bold_best=False), f"_{rv.note}_", ""]
    if t.searches:
        out += search_section(t)
    for v in (V.references_view(t), V.selection_view(t)):
        out += [f"## {v.title}", "", table(v, bold_best=False)]
    fv = V.failures_view(t)
    out += [f"## {fv.title}", "", table(fv, bold_best=False)]
    out += ["## Definitions", ""]
    out += [f"- **{name}**: {text}" for name, text in V.definitions(t)]
    out += ["", f"Full sweep, figures and provenance: [{report_href}]({report_href}).", ""]
    return "\n".join(out)


def search_section(t: Tables) -> list[str]:
    """The "Searches" section: per search its budget, spending, best validation objective and
    the candidate the leaderboard selected (with its test score and rank); the convergence per
    generation; for MAP, predicted vs measured front points."""
    sv = V.searches_view(t)
    out = [f"## {sv.title}", "", table(sv, bold_best=False), f"_{sv.note}_", ""]
    cv = V.convergence_view(t)
    out += [f"### {cv.title}", "", table(cv, bold_best=False), f"_{cv.note}_", ""]
    mv = V.map_report_view(t)
    if mv.rows:
        out += [f"### {mv.title}", "", table(mv, bold_best=False), f"_{mv.note}_", ""]
    return out
