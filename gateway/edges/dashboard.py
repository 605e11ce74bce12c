"""The admin dashboard: one HTML page, its styles and its script inline.

Rendered on the server from the /stats document, so that without JavaScript
it is a complete, readable set of tables (and the action buttons are plain
forms that POST). The script then takes over: it polls /stats every
`POLL_SECONDS`, updates the tables in place, draws the per-route charts on
canvases, and sends the actions with fetch() (adding the admin token the
operator typed, kept in sessionStorage only). No CDN, no framework, no
build step: what is here is all the page loads (CONTRACT.md "Admin API and
dashboard"); the Content-Security-Policy the admin app sends enforces it.
"""

from __future__ import annotations

import html
from typing import Any, Final
from urllib.parse import urlencode

__all__ = ["POLL_SECONDS", "render_dashboard"]

POLL_SECONDS: Final = 2

_CSS: Final = """
:root{--bg:#f5f6f8;--card:#fff;--ink:#1d2330;--muted:#667085;--line:#e4e7ec;
--ok:#12805c;--ok-bg:#e3f6ee;--bad:#c4320a;--bad-bg:#fdece6;--warn:#b54708;--warn-bg:#fef4e6;
--accent:#3656d6;--accent-bg:#e8edfc}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{background:#101828;color:#fff;padding:14px 24px;display:flex;flex-wrap:wrap;
gap:10px 24px;align-items:center}
header h1{font-size:18px;margin:0;letter-spacing:.02em}
header .meta{color:#cbd2e0;font-size:12.5px;display:flex;gap:16px;flex-wrap:wrap}
header .meta code{color:#fff}
header .actions{margin-left:auto;display:flex;gap:10px;align-items:center}
header input{background:#1d2939;border:1px solid #344054;color:#fff;border-radius:6px;
padding:5px 8px;width:12em}
main{padding:20px 24px;display:grid;gap:20px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px}
h2{font-size:15px;margin:0 0 12px;display:flex;gap:10px;align-items:baseline}
h2 small{color:var(--muted);font-weight:normal;font-size:12.5px}
h3{font-size:13.5px;margin:14px 0 6px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);
white-space:nowrap}
th{font-size:12px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;word-break:break-all}
tr:last-child td{border-bottom:none}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600}
.b-ok,.b-closed,.b-healthy{background:var(--ok-bg);color:var(--ok)}
.b-bad,.b-open,.b-unhealthy{background:var(--bad-bg);color:var(--bad)}
.b-half_open,.b-warn{background:var(--warn-bg);color:var(--warn)}
button{font:inherit;font-size:12.5px;border:1px solid var(--line);background:#fff;
color:var(--ink);border-radius:6px;padding:3px 10px;cursor:pointer}
button:hover{border-color:var(--accent);color:var(--accent)}
button:disabled{opacity:.45;cursor:default;border-color:var(--line);color:var(--ink)}
header button{background:var(--accent);border-color:var(--accent);color:#fff}
header button:hover{background:#2a46b8;color:#fff}
form{display:inline;margin:0}
.err{color:var(--bad)}
.muted{color:var(--muted)}
ul.errors{margin:6px 0 0;padding-left:20px;color:var(--bad);font-family:ui-monospace,monospace;
font-size:12.5px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.chart{border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.chart h3{margin:0 0 6px;display:flex;justify-content:space-between}
.chart h3 span{color:var(--muted);font-weight:normal;font-size:12px}
.chart canvas{width:100%;height:90px;display:block}
.legend{font-size:11.5px;color:var(--muted);display:flex;gap:12px;margin:2px 0 8px}
.legend i{display:inline-block;width:10px;height:3px;vertical-align:middle;margin-right:4px}
#charts-section{display:none}
.js #charts-section{display:block}
#extras{display:grid;gap:20px}
#extras:empty{display:none}
#flash{min-height:1.2em;font-size:12.5px}
#live{font-size:12px;color:#98a2b3;display:none}
.js #live{display:inline}
#live.on{color:#6ce9a6}
"""

_JS: Final = r"""
"use strict";
(function () {
  document.documentElement.classList.add("js");
  var POLL = %(poll)d * 1000;
  var tokenBox = document.getElementById("token");
  var flash = document.getElementById("flash");
  var live = document.getElementById("live");
  var last = null;
  try { tokenBox.value = sessionStorage.getItem("gw-admin-token") || ""; } catch (e) { }
  tokenBox.addEventListener("change", function () {
    try { sessionStorage.setItem("gw-admin-token", tokenBox.value); } catch (e) { }
  });

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) { for (var k in attrs) { node.setAttribute(k, attrs[k]); } }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function fmt(v, digits) {
    return v === null || v === undefined ? "\u2013" : Number(v).toFixed(digits);
  }
  function pct(v) { return (v * 100).toFixed(v >= 0.1 ? 0 : v >= 0.01 ? 1 : 2) + " %%"; }
  function badge(cls, text) { return el("span", {"class": "badge b-" + cls}, text); }
  function setCell(cell, value) {
    if (typeof value === "string") {
      if (cell.textContent !== value) { cell.textContent = value; }
    } else {
      cell.replaceChildren(value);
    }
  }
  function say(text, bad) {
    flash.textContent = text;
    flash.className = bad ? "err" : "muted";
  }

  // -- tables, updated in place (rows keyed by route / upstream+target) --
  function syncRows(tbody, items, key, build, update) {
    var rows = {};
    Array.prototype.forEach.call(tbody.rows, function (r) { rows[r.dataset.key] = r; });
    var wanted = items.map(key);
    var same = wanted.length === tbody.rows.length &&
      wanted.every(function (k, i) { return tbody.rows[i].dataset.key === k; });
    if (!same) {
      tbody.replaceChildren();
      items.forEach(function (item, i) {
        var row = rows[wanted[i]] || build(item);
        row.dataset.key = wanted[i];
        tbody.appendChild(row);
      });
    }
    items.forEach(function (item, i) { update(tbody.rows[i], item); });
  }
  function cells(row) {
    var out = {};
    row.querySelectorAll("[data-field]").forEach(function (c) { out[c.dataset.field] = c; });
    return out;
  }

  function routeRow(item) {
    var row = el("tr", {"data-route": item.name});
    row.appendChild(el("td", {"data-field": "name"}, item.name));
    row.appendChild(el("td", {"data-field": "match", "class": "muted"}));
    row.appendChild(el("td", {"data-field": "upstream"}));
    ["rps", "error_rate", "p50_ms", "p99_ms", "requests"].forEach(function (f) {
      row.appendChild(el("td", {"data-field": f, "class": "num"}));
    });
    return row;
  }
  function updateRoute(row, item) {
    var c = cells(row), r = item.stats;
    setCell(c.match, r.path);
    setCell(c.upstream, r.upstream);
    setCell(c.rps, fmt(r.rps, 1));
    setCell(c.error_rate, r.errors ?
      badge(r.error_rate >= 0.05 ? "bad" : "warn", pct(r.error_rate)) : "0 %%");
    setCell(c.p50_ms, fmt(r.p50_ms, 1));
    setCell(c.p99_ms, fmt(r.p99_ms, 1));
    setCell(c.requests, String(r.requests));
  }

  function resetForm(upstream, target, enabled) {
    var q = "upstream=" + encodeURIComponent(upstream) +
      (target ? "&target=" + encodeURIComponent(target) : "");
    var form = el("form",
      {"method": "post", "action": "/breakers/reset?" + q, "data-action": "reset"});
    var button = el("button", {"type": "submit"}, target ? "Reset breaker" : "Reset all");
    button.disabled = !enabled;
    form.appendChild(button);
    return form;
  }
  function targetRow(item) {
    var row = el("tr", {"data-upstream": item.upstream, "data-target": item.t.url});
    row.appendChild(el("td", {"data-field": "url", "class": "wrap"}, item.t.url));
    row.appendChild(el("td", {"data-field": "weight", "class": "num"}));
    row.appendChild(el("td", {"data-field": "healthy"}));
    row.appendChild(el("td", {"data-field": "breaker"}));
    ["breaker_failures", "in_flight"].forEach(function (f) {
      row.appendChild(el("td", {"data-field": f, "class": "num"}));
    });
    var action = el("td", {"data-field": "action"});
    action.appendChild(resetForm(item.upstream, item.t.url, item.t.breaker !== "closed"));
    row.appendChild(action);
    return row;
  }
  function updateTarget(row, item) {
    var c = cells(row), t = item.t;
    setCell(c.weight, String(t.weight));
    if (c.healthy.dataset.v !== String(t.healthy)) {
      c.healthy.dataset.v = String(t.healthy);
      var health = t.healthy ? "healthy" : "unhealthy";
      setCell(c.healthy, badge(health, health));
    }
    if (c.breaker.dataset.v !== t.breaker) {
      c.breaker.dataset.v = t.breaker;
      setCell(c.breaker, badge(t.breaker, t.breaker.replace("_", "-")));
    }
    setCell(c.breaker_failures, String(t.breaker_failures));
    setCell(c.in_flight, String(t.in_flight));
    c.action.querySelector("button").disabled = t.breaker === "closed";
  }

  function upstreamBlock(name) {
    var block = el("div", {"class": "upstream", "data-upstream": name});
    var h = el("h3");
    h.appendChild(el("span", {"data-field": "title"}, name));
    block.appendChild(h);
    var table = el("table");
    var head = el("tr");
    [["target", ""], ["weight", "num"], ["health", ""], ["breaker", ""],
     ["failures", "num"], ["in flight", "num"], ["", ""]].forEach(function (p) {
      head.appendChild(el("th", p[1] ? {"class": p[1]} : null, p[0]));
    });
    table.appendChild(el("thead")).appendChild(head);
    table.appendChild(el("tbody"));
    block.appendChild(table);
    return block;
  }
  function renderUpstreams(upstreams) {
    var box = document.getElementById("upstreams");
    var names = Object.keys(upstreams);
    var have = Array.prototype.map.call(box.children, function (b) { return b.dataset.upstream; });
    if (have.join("\n") !== names.join("\n")) {
      var old = {};
      Array.prototype.forEach.call(box.children, function (b) { old[b.dataset.upstream] = b; });
      box.replaceChildren();
      names.forEach(function (n) { box.appendChild(old[n] || upstreamBlock(n)); });
    }
    names.forEach(function (name, i) {
      var u = upstreams[name], block = box.children[i];
      var title = block.querySelector("[data-field=title]");
      var text = name + " \u00b7 " + u.balancer + (u.panic ? " \u00b7 PANIC" : "");
      setCell(title, text);
      var items = u.targets.map(function (t) { return {upstream: name, t: t}; });
      syncRows(block.querySelector("tbody"), items,
        function (it) { return it.t.url; }, targetRow, updateTarget);
    });
  }

  function renderConfig(cfg) {
    setCell(document.getElementById("cfg-path"), cfg.path);
    setCell(document.getElementById("cfg-hash"), cfg.sha256.slice(0, 12));
    document.getElementById("cfg-hash").title = cfg.sha256;
    setCell(document.getElementById("cfg-loaded"), cfg.loaded_at);
    var r = cfg.last_reload, box = document.getElementById("reload-result");
    box.replaceChildren();
    if (!r) { box.appendChild(el("span", {"class": "muted"}, "no reload since start")); return; }
    box.appendChild(badge(r.ok ? "ok" : "bad", r.ok ? "reload ok" : "reload rejected"));
    box.appendChild(document.createTextNode(" " + r.at + " \u00b7 " + r.message +
      (r.changes ? " \u00b7 " + r.changes : "")));
    if (r.errors.length) {
      var list = el("ul", {"class": "errors"});
      r.errors.forEach(function (e) { list.appendChild(el("li", null, e)); });
      box.appendChild(list);
    }
  }

  function renderExtras(stats) {
    var box = document.getElementById("extras");
    var known = {time: 1, window: 1, config: 1, routes: 1, upstreams: 1,
      admin_token_required: 1, cache_purge: 1};
    var wanted = Object.keys(stats).filter(function (k) { return !known[k]; });
    box.replaceChildren();
    wanted.forEach(function (name) {
      var sec = el("section", {"data-section": name});
      sec.appendChild(el("h2", null, name.charAt(0).toUpperCase() + name.slice(1)));
      sec.appendChild(kvTable(stats[name]));
      box.appendChild(sec);
    });
  }
  function kvTable(value) {
    var table = el("table"), body = el("tbody");
    table.appendChild(body);
    function add(k, v) {
      var row = el("tr");
      row.appendChild(el("th", null, k));
      row.appendChild(el("td", {"class": "wrap"}, typeof v === "object" ? JSON.stringify(v) : v));
      body.appendChild(row);
    }
    if (value && typeof value === "object" && !Array.isArray(value)) {
      Object.keys(value).forEach(function (k) { add(k, value[k]); });
    } else { add("value", value); }
    return table;
  }

  // -- charts: one card per route, requests/s and latency over the minute --
  function chartCard(name) {
    var card = el("div", {"class": "chart", "data-chart": name});
    var h = el("h3", null, name);
    h.appendChild(el("span", {"data-field": "now"}));
    card.appendChild(h);
    var l1 = el("div", {"class": "legend"});
    l1.innerHTML = '<span><i style="background:#3656d6"></i>requests/s</span>' +
      '<span><i style="background:#d92d20"></i>errors/s</span>';
    card.appendChild(l1);
    card.appendChild(el("canvas", {"class": "rps"}));
    var l2 = el("div", {"class": "legend"});
    l2.innerHTML = '<span><i style="background:#12b76a"></i>p50 ms</span>' +
      '<span><i style="background:#f79009"></i>p99 ms</span>';
    card.appendChild(l2);
    card.appendChild(el("canvas", {"class": "lat"}));
    return card;
  }
  function niceMax(v) {
    if (!(v > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }
  function draw(canvas, series, kinds) {
    var dpr = window.devicePixelRatio || 1;
    var w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) { return; }
    if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); }
    if (canvas.height !== Math.round(h * dpr)) { canvas.height = Math.round(h * dpr); }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var max = 0;
    series.forEach(function (s) { s.forEach(function (v) { if (v > max) { max = v; } }); });
    max = niceMax(max);
    var left = 34, top = 4, bottom = h - 14, width = w - left - 2, n = series[0].length;
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillStyle = "#98a2b3";
    ctx.strokeStyle = "#eaecf0";
    ctx.lineWidth = 1;
    [0, 0.5, 1].forEach(function (f) {
      var y = Math.round(bottom - (bottom - top) * f) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + width, y); ctx.stroke();
      var label = max * f;
      ctx.fillText(label >= 100 ? label.toFixed(0) : String(+label.toPrecision(2)), 2, y + 3);
    });
    ctx.fillText("-60 s", left, h - 2);
    ctx.fillText("now", left + width - 18, h - 2);
    var step = width / n;
    series.forEach(function (s, k) {
      var kind = kinds[k];
      ctx.fillStyle = kind.color;
      ctx.strokeStyle = kind.color;
      if (kind.bars) {
        s.forEach(function (v, i) {
          if (!v) { return; }
          var bh = (bottom - top) * v / max;
          ctx.fillRect(left + i * step + 0.5, bottom - bh, Math.max(step - 1, 1), bh);
        });
        return;
      }
      ctx.lineWidth = 1.75;
      ctx.beginPath();
      var pen = false;
      s.forEach(function (v, i) {
        if (v === null) { pen = false; return; }
        var x = left + (i + 0.5) * step, y = bottom - (bottom - top) * v / max;
        if (pen) { ctx.lineTo(x, y); } else { ctx.moveTo(x, y); pen = true; }
      });
      ctx.stroke();
    });
  }
  function renderCharts(routes) {
    var box = document.getElementById("charts");
    var names = Object.keys(routes);
    var have = Array.prototype.map.call(box.children, function (c) { return c.dataset.chart; });
    if (have.join("\n") !== names.join("\n")) {
      box.replaceChildren();
      names.forEach(function (n) { box.appendChild(chartCard(n)); });
    }
    names.forEach(function (name, i) {
      var r = routes[name], card = box.children[i], s = r.series;
      setCell(card.querySelector("[data-field=now]"),
        fmt(r.rps, 1) + " req/s \u00b7 p99 " + fmt(r.p99_ms, 1) + " ms");
      draw(card.querySelector("canvas.rps"), [s.requests, s.errors],
        [{color: "#3656d6", bars: true}, {color: "#d92d20", bars: true}]);
      draw(card.querySelector("canvas.lat"), [s.p50_ms, s.p99_ms],
        [{color: "#12b76a"}, {color: "#f79009"}]);
    });
  }

  function render(stats) {
    last = stats;
    renderConfig(stats.config);
    document.getElementById("token-box").hidden = !stats.admin_token_required;
    var items = Object.keys(stats.routes).map(function (n) {
      return {name: n, stats: stats.routes[n]};
    });
    syncRows(document.querySelector("#routes tbody"), items,
      function (it) { return it.name; }, routeRow, updateRoute);
    renderUpstreams(stats.upstreams);
    renderCharts(stats.routes);
    renderExtras(stats);
    setCell(document.getElementById("updated"), "updated " + stats.time);
  }

  var timer = null;
  function poll() {
    clearTimeout(timer);
    fetch("/stats", {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("/stats answered " + r.status); }
      return r.json();
    }).then(function (stats) {
      live.className = "on";
      render(stats);
    }).catch(function (e) {
      live.className = "";
      say("no data: " + e.message, true);
    }).then(function () { timer = setTimeout(poll, POLL); });
  }

  // -- actions: the no-script forms, sent with fetch and the token --
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.dataset.action) { return; }
    event.preventDefault();
    var headers = {};
    if (tokenBox.value) { headers.Authorization = "Bearer " + tokenBox.value; }
    var button = form.querySelector("button");
    button.disabled = true;
    fetch(form.getAttribute("action"), {method: "POST", headers: headers}).then(function (r) {
      return r.json().then(function (body) { return {status: r.status, body: body}; });
    }).then(function (res) {
      var b = res.body;
      if (b.error) {
        say(form.dataset.action + ": " + b.message, true);
        if (res.status === 401 || res.status === 403) {
          document.getElementById("token-box").hidden = false;
          tokenBox.focus();
        }
      } else if (form.dataset.action === "reset") {
        say("breakers reset: " + b.reset);
      } else if (form.dataset.action === "reload") {
        var n = b.errors.length;
        say("reload: " + b.message + (n ? " (" + n + " errors)" : ""), !b.ok);
      } else {
        say(form.dataset.action + ": " + JSON.stringify(b));
      }
    }).catch(function (e) {
      say(form.dataset.action + " failed: " + e.message, true);
    }).then(function () {
      button.disabled = false;
      poll();
    });
  });
  window.addEventListener("resize", function () { if (last) { renderCharts(last.routes); } });
  poll();
})();
"""

_SCRIPT: Final = _JS % {"poll": POLL_SECONDS}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "\u2013" if value is None else f"{value:.{digits}f}"


def _percent(share: float) -> str:
    # As the script's pct(): more digits for the small shares that matter.
    digits = 0 if share >= 0.1 else 1 if share >= 0.01 else 2
    return f"{share * 100:.{digits}f} %"


def _badge(cls: str, text: str) -> str:
    return f'<span class="badge b-{_e(cls)}">{_e(text)}</span>'


def _reset_form(upstream: str, target: str | None, enabled: bool) -> str:
    query = {"upstream": upstream} | ({"target": target} if target else {})
    label = "Reset breaker" if target else "Reset all"
    disabled = "" if enabled else " disabled"
    return (
        f'<form method="post" action="/breakers/reset?{_e(urlencode(query))}" '
        f'data-action="reset"><button type="submit"{disabled}>{label}</button></form>'
    )


def _routes(stats: dict[str, Any]) -> str:
    rows = []
    for name, r in stats["routes"].items():
        error_rate = r["error_rate"]
        errors = (
            _badge("bad" if error_rate >= 0.05 else "warn", _percent(error_rate))
            if r["errors"]
            else "0 %"
        )
        rows.append(
            f'<tr data-route="{_e(name)}" data-key="{_e(name)}">'
            f'<td data-field="name">{_e(name)}</td>'
            f'<td data-field="match" class="muted">{_e(r["path"])}</td>'
            f'<td data-field="upstream">{_e(r["upstream"])}</td>'
            f'<td data-field="rps" class="num">{_fmt(r["rps"])}</td>'
            f'<td data-field="error_rate" class="num">{errors}</td>'
            f'<td data-field="p50_ms" class="num">{_fmt(r["p50_ms"])}</td>'
            f'<td data-field="p99_ms" class="num">{_fmt(r["p99_ms"])}</td>'
            f'<td data-field="requests" class="num">{r["requests"]}</td></tr>'
        )
    return "".join(rows) or '<tr><td colspan="8" class="muted">no routes</td></tr>'


def _upstreams(stats: dict[str, Any]) -> str:
    blocks = []
    for name, u in stats["upstreams"].items():
        rows = []
        for t in u["targets"]:
            healthy = "healthy" if t["healthy"] else "unhealthy"
            breaker = t["breaker"]
            rows.append(
                f'<tr data-upstream="{_e(name)}" data-target="{_e(t["url"])}" '
                f'data-key="{_e(t["url"])}">'
                f'<td data-field="url" class="wrap">{_e(t["url"])}</td>'
                f'<td data-field="weight" class="num">{t["weight"]}</td>'
                f'<td data-field="healthy" data-v="{str(t["healthy"]).lower()}">'
                f"{_badge(healthy, healthy)}</td>"
                f'<td data-field="breaker" data-v="{_e(breaker)}">'
                f"{_badge(breaker, breaker.replace('_', '-'))}</td>"
                f'<td data-field="breaker_failures" class="num">{t["breaker_failures"]}</td>'
                f'<td data-field="in_flight" class="num">{t["in_flight"]}</td>'
                f'<td data-field="action">{_reset_form(name, t["url"], breaker != "closed")}</td>'
                "</tr>"
            )
        title = f"{name} \u00b7 {u['balancer']}" + (" \u00b7 PANIC" if u["panic"] else "")
        blocks.append(
            f'<div class="upstream" data-upstream="{_e(name)}">'
            f'<h3><span data-field="title">{_e(title)}</span></h3><table><thead><tr>'
            '<th>target</th><th class="num">weight</th><th>health</th><th>breaker</th>'
            '<th class="num">failures</th><th class="num">in flight</th><th></th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )
    return "".join(blocks)


def _reload(config: dict[str, Any]) -> str:
    result = config.get("last_reload")
    if result is None:
        return '<span class="muted">no reload since start</span>'
    text = f" {result['at']} \u00b7 {result['message']}"
    if result["changes"]:
        text += f" \u00b7 {result['changes']}"
    out = _badge(
        "ok" if result["ok"] else "bad", "reload ok" if result["ok"] else "reload rejected"
    )
    out += _e(text)
    if result["errors"]:
        out += '<ul class="errors">' + "".join(f"<li>{_e(e)}</li>" for e in result["errors"])
        out += "</ul>"
    return out


_KNOWN: Final = frozenset(
    {"time", "window", "config", "routes", "upstreams", "admin_token_required", "cache_purge"}
)


def _extras(stats: dict[str, Any]) -> str:
    out = []
    for name, value in stats.items():
        if name in _KNOWN:
            continue
        items = value.items() if isinstance(value, dict) else [("value", value)]
        rows = "".join(f'<tr><th>{_e(k)}</th><td class="wrap">{_e(v)}</td></tr>' for k, v in items)
        out.append(
            f'<section data-section="{_e(name)}"><h2>{_e(name.capitalize())}</h2>'
            f"<table><tbody>{rows}</tbody></table></section>"
        )
    return "".join(out)


def render_dashboard(stats: dict[str, Any]) -> str:
    """The whole page for one /stats document."""
    config = stats["config"]
    token_hidden = "" if stats["admin_token_required"] else " hidden"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>gateway \u00b7 dashboard</title>
<style>{_CSS}</style></head>
<body>
<header>
<h1>gateway</h1>
<div class="meta">
<span>config <code id="cfg-path">{_e(config["path"])}</code></span>
<span>sha256 <code id="cfg-hash"
 title="{_e(config["sha256"])}">{_e(config["sha256"][:12])}</code></span>
<span>loaded <code id="cfg-loaded">{_e(config["loaded_at"])}</code></span>
</div>
<div class="actions">
<label id="token-box"{token_hidden}>admin token
<input id="token" type="password" autocomplete="off"></label>
<form method="post" action="/reload" data-action="reload">
<button type="submit">Reload config</button></form>
<span id="live">\u25cf live</span>
</div>
</header>
<main>
<section id="config-section"><h2>Last reload</h2>
<div id="reload-result">{_reload(config)}</div>
<div id="flash" role="status"></div></section>
<section id="routes-section"><h2>Routes
<small id="updated">over the last minute, as of {_e(stats["time"])}</small></h2>
<table id="routes"><thead><tr><th>route</th><th>match</th><th>upstream</th>
<th class="num">req/s</th><th class="num">errors</th><th class="num">p50 ms</th>
<th class="num">p99 ms</th><th class="num">requests</th></tr></thead>
<tbody>{_routes(stats)}</tbody></table></section>
<section id="charts-section"><h2>Traffic <small>last 60 s, per second</small></h2>
<div id="charts" class="grid"></div></section>
<section id="upstreams-section"><h2>Upstreams</h2>
<div id="upstreams">{_upstreams(stats)}</div></section>
<div id="extras">{_extras(stats)}</div>
</main>
<script>{_SCRIPT}</script>
</body></html>
"""
