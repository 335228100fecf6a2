"""The report's script in a real (headless) browser: search, sort, pages and the leaderboard's
expert-set selector, on a synthetic sweep big enough to page. Skipped where no Chromium is
installed (`apt-get install chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from helpers_pipeline import REPO
from mergesweep.aggregate.leaderboard import compute_tables
from mergesweep.aggregate.report import PAGE_ROWS, render_report
from mergesweep.aggregate.scores import build_scores

sys.path.insert(0, str(REPO / "benchmarks"))
from synth_evals import generate  # noqa: E402

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

# runs after the report's own script: drives the tables as a reader would, writes what it saw
PROBE = r"""
<pre id="probe"></pre>
<script>
(function () {
  var out = {};
  try {
  function box(title) {
    var h = Array.prototype.find.call(document.querySelectorAll("h2, h3"), function (e) { return e.textContent.indexOf(title) === 0; });
    var el = h.nextElementSibling;
    while (el && !(el.classList && el.classList.contains("tbl"))) { el = el.nextElementSibling; }
    return el;
  }
  function rows(b) { return Array.prototype.map.call(b.querySelectorAll("tbody tr"), function (tr) {
    return Array.prototype.map.call(tr.cells, function (td) { return td.textContent; }); }); }
  function info(b) { return b.querySelector(".info").textContent; }
  var all = box("All merged models");
  out.all_initial = {rows: rows(all).length, info: info(all), tools_hidden: all.querySelector(".tools").hidden};
  all.querySelector("button.next").click();
  out.all_page2 = {first: rows(all)[0][0], info: info(all)};
  var search = all.querySelector("input.search");
  search.value = "TARGET_ID";
  search.dispatchEvent(new Event("input"));
  out.all_search = {rows: rows(all), info: info(all)};
  search.value = "";
  search.dispatchEvent(new Event("input"));
  var heads = all.querySelectorAll("thead th");
  var mean = Array.prototype.findIndex.call(heads, function (th) { return th.textContent.indexOf("Mean val") === 0; });
  heads[mean].click();
  out.all_sorted_desc = rows(all).map(function (r) { return r[mean]; });
  heads[mean].click();
  out.all_sorted_asc = rows(all).map(function (r) { return r[mean]; });
  out.aria = heads[mean].getAttribute("aria-sort");
  var lead = box("Leaderboard");
  var sel = lead.querySelector("select.group");
  out.groups = Array.prototype.map.call(sel.options, function (o) { return o.textContent; });
  out.lead_first = rows(lead);
  sel.value = sel.options[sel.options.length - 2].value;
  sel.dispatchEvent(new Event("change"));
  out.lead_last_group = rows(lead);
  sel.value = "*";
  sel.dispatchEvent(new Event("change"));
  out.lead_all = {rows: rows(lead).length, info: info(lead)};
  } catch (e) { out.error = String(e) + " " + e.stack; }
  document.getElementById("probe").textContent = JSON.stringify(out);
})();
</script>
"""


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    tree = generate(root / "tree", 400, tasks=2, indent=None)
    tables = compute_tables(build_scores([tree.evals]))
    target = tables.leaderboard["model_id"].iloc[-1]
    html = render_report(tables, {}).replace("</body>", PROBE.replace("TARGET_ID", target) + "</body>")
    page = root / "report.html"
    page.write_text(html)
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), proc.stderr[-2000:]
    import html as html_lib

    seen = json.loads(html_lib.unescape(m.group(1)))
    assert "error" not in seen, seen["error"]
    return seen, tables, target


def test_long_table_is_paged_and_searchable(probed):
    seen, tables, target = probed
    n = len(tables.leaderboard)
    pages = -(-n // PAGE_ROWS)
    assert seen["all_initial"] == {"rows": PAGE_ROWS, "info": f"{n} rows · page 1 of {pages}", "tools_hidden": False}
    assert seen["all_page2"]["info"] == f"{n} rows · page 2 of {pages}"
    # the search finds a model on the last page, and only it
    assert [r[0] for r in seen["all_search"]["rows"]] == [target]
    assert seen["all_search"]["info"] == f"1 of {n} rows"


def test_numeric_sort_both_ways(probed):
    seen, tables, _ = probed

    def val(text):  # "0.812 / 0.790" -> validation value; "–" or "error" -> None
        m = re.match(r"−?\d+\.\d+", text)
        return float(m.group(0).replace("−", "-")) if m else None

    desc = [val(t) for t in seen["all_sorted_desc"]]
    asc = [val(t) for t in seen["all_sorted_asc"]]
    best = tables.leaderboard["norm_val_mean"].max()
    assert desc[0] == pytest.approx(round(best, 3)) and desc == sorted(desc, reverse=True)
    assert asc == sorted(asc) and asc[0] == pytest.approx(round(tables.leaderboard["norm_val_mean"].min(), 3))
    assert seen["aria"] == "ascending"


def test_leaderboard_expert_set_selector(probed):
    seen, tables, _ = probed
    sel = tables.leaderboard[tables.leaderboard["selected"]]
    n_sets = sel["experts"].nunique()
    assert len(seen["groups"]) == n_sets + 1 and seen["groups"][-1].startswith("all expert sets")
    # first: the largest expert set, its methods ranked 1, 2, ...
    first = seen["lead_first"]
    assert len({r[2] for r in first}) == 1 and first[0][2].count("+") == 4
    assert [r[0] for r in first] == [str(i) for i in range(1, len(first) + 1)]
    assert {r[2] for r in seen["lead_last_group"]} != {first[0][2]}
    assert seen["lead_all"]["rows"] == min(PAGE_ROWS, len(sel)) and f"{len(sel)} rows" in seen["lead_all"]["info"]
