// mergesweep report: sortable, searchable, paged tables and the leaderboard's expert-set selector.
// Vanilla JS, no network. Without it the report still reads: every small table is complete, a big
// one shows its first rows and says where the full table is.
(function () {
  "use strict";
  var MINUS = /\u2212/g;
  function number(text) {
    var m = String(text).replace(MINUS, "-").match(/^\s*[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?/i);
    return m ? parseFloat(m[0]) : null;
  }
  function rowFromData(cells, numeric, groupCol) {
    // a cell is "text" or [text, flags, se]; flags: b = best, e = error
    var tr = document.createElement("tr");
    cells.forEach(function (c, i) {
      var td = document.createElement("td"), text = c, flags = "", se = "";
      if (Array.isArray(c)) { text = c[0]; flags = c[1] || ""; se = c[2] || ""; }
      td.className = (numeric[i] ? "num" : "txt") + (flags.indexOf("b") >= 0 ? " best" : "") +
                     (flags.indexOf("e") >= 0 ? " err" : "") + (i === groupCol ? " grpcol" : "");
      td.textContent = text;
      if (se) {
        var span = document.createElement("span");
        span.className = "se";
        span.textContent = " \u00b1 " + se;
        td.appendChild(span);
      }
      tr.appendChild(td);
    });
    return tr;
  }
  function setup(box) {
    var table = box.querySelector("table"), tbody = table.tBodies[0];
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var numeric = heads.map(function (th) { return th.classList.contains("n"); });
    var groupCol = heads.findIndex(function (th) { return th.classList.contains("grpcol"); });
    var data = box.querySelector("script.rows"), doc = data ? JSON.parse(data.textContent) : null;
    var trs = doc ? doc.rows.map(function (cells) { return rowFromData(cells, numeric, groupCol); })
                  : Array.prototype.slice.call(tbody.rows);
    var rows = trs.map(function (tr, i) {
      var texts = Array.prototype.map.call(tr.cells, function (td) { return td.textContent; });
      return {tr: tr, i: i, texts: texts, search: texts.join(" \u0001 ").toLowerCase(),
              group: doc ? (doc.groups ? doc.groups[i] : null) : tr.getAttribute("data-g")};
    });
    var pageSize = parseInt(box.getAttribute("data-page") || "0", 10) || rows.length || 1;
    var state = {q: "", col: -1, dir: 1, page: 0, group: null};
    var tools = box.querySelector(".tools");
    var search = box.querySelector("input.search"), info = box.querySelector(".info");
    var prev = box.querySelector("button.prev"), next = box.querySelector("button.next");
    var select = box.querySelector("select.group");
    if (tools) { tools.hidden = false; }
    box.querySelectorAll(".noscript").forEach(function (el) { el.hidden = true; });
    if (select) { state.group = select.value; }
    function key(row, col) {
      var t = row.texts[col];
      if (numeric[col]) {
        var v = number(t);
        return v === null ? null : v;
      }
      return t === "\u2013" || t === "" ? null : t.toLowerCase();
    }
    function render() {
      var q = state.q;
      // one expert set shown: its name is in the selector, not repeated on every row
      box.classList.toggle("onegroup", state.group !== null && state.group !== "*");
      var shown = rows.filter(function (r) {
        return (state.group === null || state.group === "*" || r.group === state.group) &&
               (!q || r.search.indexOf(q) >= 0);
      });
      if (state.col >= 0) {
        var c = state.col, d = state.dir;
        shown.sort(function (a, b) {
          var ka = key(a, c), kb = key(b, c);
          if (ka === null && kb === null) { return a.i - b.i; }
          if (ka === null) { return 1; }  // missing values last, either direction
          if (kb === null) { return -1; }
          if (ka < kb) { return -d; }
          if (ka > kb) { return d; }
          return a.i - b.i;
        });
      }
      var pages = Math.max(1, Math.ceil(shown.length / pageSize));
      state.page = Math.min(state.page, pages - 1);
      var start = state.page * pageSize, slice = shown.slice(start, start + pageSize);
      var frag = document.createDocumentFragment();
      slice.forEach(function (r) { frag.appendChild(r.tr); });
      tbody.textContent = "";
      tbody.appendChild(frag);
      if (info) {
        info.textContent = (shown.length === rows.length ? rows.length + " rows" :
                            shown.length + " of " + rows.length + " rows") +
                           (pages > 1 ? " \u00b7 page " + (state.page + 1) + " of " + pages : "");
      }
      if (prev) { prev.disabled = state.page === 0; prev.hidden = pages < 2; }
      if (next) { next.disabled = state.page >= pages - 1; next.hidden = pages < 2; }
    }
    heads.forEach(function (th, col) {
      th.classList.add("sort");
      th.title = "Sort by this column";
      th.addEventListener("click", function () {
        state.dir = state.col === col ? -state.dir : (numeric[col] ? -1 : 1);  // numbers: highest first
        state.col = col;
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
        state.page = 0;
        render();
      });
    });
    if (search) {
      search.addEventListener("input", function () { state.q = search.value.trim().toLowerCase(); state.page = 0; render(); });
    }
    if (select) {
      select.addEventListener("change", function () { state.group = select.value; state.page = 0; render(); });
    }
    if (prev) { prev.addEventListener("click", function () { state.page -= 1; render(); }); }
    if (next) { next.addEventListener("click", function () { state.page += 1; render(); }); }
    render();
  }
  Array.prototype.forEach.call(document.querySelectorAll("div.tbl"), setup);
})();
