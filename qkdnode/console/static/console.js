/* qkdnode operator console: renders the page named by <body data-page> from the node's
   JSON API and keeps it live from the server-sent event stream /api/events.
   No framework, no network access beyond the node itself. */
"use strict";

(function () {
  const body = document.body;
  const PAGE = body.dataset.page;
  const LINK = body.dataset.link;
  const ROLE = body.dataset.role;
  const STALE_AFTER_S = parseFloat(body.dataset.staleAfterS || "15");
  const TOKEN = document.querySelector('meta[name="console-token"]').content;
  const app = document.getElementById("app");
  const liveEl = document.getElementById("live");

  // ---- formatting ------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function fixed(x) {
    const a = Math.abs(x);
    return x.toFixed(a >= 100 || a === 0 ? 0 : a >= 10 ? 1 : 2);
  }
  function fmtRate(bps) {
    if (bps === null || bps === undefined) return "–";
    const a = Math.abs(bps);
    if (a >= 1e6) return fixed(bps / 1e6) + " Mb/s";
    if (a >= 1e3) return fixed(bps / 1e3) + " kb/s";
    return fixed(bps) + " b/s";
  }
  function fmtHz(hz) {
    if (hz === null || hz === undefined) return "–";
    if (hz >= 1e6) return (hz / 1e6).toFixed(2) + " MHz";
    if (hz >= 1e3) return (hz / 1e3).toFixed(1) + " kHz";
    return hz.toFixed(0) + " Hz";
  }
  function fmtPs(ps) {
    const a = Math.abs(ps);
    const [f, u] = a >= 1e12 ? [1e12, " s"] : a >= 1e9 ? [1e9, " ms"] : a >= 1e6 ? [1e6, " µs"] : a >= 1e3 ? [1e3, " ns"] : [1, " ps"];
    return +(ps / f).toPrecision(10) + u;
  }
  function fmtPct(x, digits) {
    if (x === null || x === undefined) return "–";
    return (100 * x).toFixed(digits === undefined ? 2 : digits) + " %";
  }
  function fmtBits(n) {
    if (n === null || n === undefined) return "–";
    if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(2) + " Gbit";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(2) + " Mbit";
    if (Math.abs(n) >= 1e3) return (n / 1e3).toFixed(1) + " kbit";
    return n + " bit";
  }
  function fmtAge(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    s = Math.max(0, s);
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  function fmtTime(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toLocaleString();
  }
  const now = () => Date.now() / 1000;

  // state -> (class, symbol): the symbol says it without colour
  const STATES = {
    EXCHANGING: ["ok", "●"], IDLE: ["idle", "○"], CONNECTING: ["busy", "◌"],
    CALIBRATING: ["busy", "◐"], SYNCHRONIZING: ["busy", "◑"], PAUSED: ["warn", "‖"],
    FAULT: ["bad", "✖"], OFFLINE: ["bad", "✖"], SHUTDOWN: ["idle", "■"], UNKNOWN: ["bad", "?"],
  };
  function stateBadge(state, stale) {
    const [cls, sym] = STATES[state] || ["idle", "?"];
    return el("span", { class: "badge state " + (stale ? "stale" : cls), "data-state": state,
      title: stale ? "no fresh status: last known state" : state },
      el("span", { "aria-hidden": "true", text: sym + " " }), state, stale ? " (stale)" : "");
  }
  const SEV = { critical: ["bad", "▲"], major: ["warn", "◆"], warning: ["note", "●"] };
  function sevBadge(sev) {
    const [cls, sym] = SEV[sev] || ["note", "•"];
    return el("span", { class: "badge sev " + cls }, el("span", { "aria-hidden": "true", text: sym + " " }), sev);
  }

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  // ---- live stream and staleness ----------------------------------------------------
  const handlers = {};
  let lastHeard = 0;
  let connected = false;
  function on(event, fn) { (handlers[event] = handlers[event] || []).push(fn); }
  function connect() {
    const es = new EventSource("/api/events");
    const heard = () => { lastHeard = now(); connected = true; showLive(); };
    es.onopen = heard;
    es.onmessage = heard;
    for (const name of ["overview", "block", "alarm", "rates", "event", "network"]) {
      es.addEventListener(name, (ev) => {
        heard();
        let data;
        try { data = JSON.parse(ev.data); } catch (e) { return; }
        for (const fn of handlers[name] || []) fn(data);
      });
    }
    es.onerror = () => { connected = false; showLive(); };
  }
  function showLive() {
    const age = now() - lastHeard;
    const stale = !connected || age > STALE_AFTER_S;
    body.classList.toggle("is-stale", stale);
    liveEl.className = "live " + (stale ? "stale" : "ok");
    liveEl.textContent = !lastHeard ? "connecting…"
      : stale ? "⚠ stale: no update for " + fmtAge(age) : "● live";
  }
  setInterval(showLive, 1000);

  // ---- overview ---------------------------------------------------------------------
  function linkStale(row) {
    return !row.reachable || now() - row.updated_s > STALE_AFTER_S;
  }
  function metric(label, value, cls, raw) {
    return el("div", { class: "metric " + (cls || "") , "data-value": raw === undefined ? null : raw },
      el("div", { class: "label", text: label }), el("div", { class: "value", text: value }));
  }
  function linkCard(row, withLink) {
    const stale = linkStale(row);
    const age = row.state_since_s ? now() - row.state_since_s : null;
    const title = withLink ? el("a", { href: "/links/" + encodeURIComponent(row.link), text: row.link }) : row.link;
    const fill = Math.min(1, row.fill_ratio || 0);
    const alarms = row.alarms.length
      ? el("ul", { class: "alarms" }, ...row.alarms.map((a) =>
          el("li", { class: "alarm", "data-alarm": a.name }, sevBadge(a.severity), " ", el("b", { text: a.name }), " ",
            el("span", { class: "muted", text: a.cause + " (" + fmtAge(now() - a.since_s) + ")" }))))
      : el("p", { class: "muted no-alarms", text: "no active alarm" });
    return el("section", { class: "card link" + (stale ? " stale" : ""), "data-link": row.link },
      el("h2", {}, title, " ", el("span", { class: "muted", text: row.role + " → " + row.peer_id })),
      el("div", { class: "state-line" }, stateBadge(row.state, stale),
        el("span", { class: "muted age", text: " for " + fmtAge(age) }),
        row.peer_connected ? null : el("span", { class: "badge bad", text: "✖ peer unreachable" })),
      el("div", { class: "metrics" },
        metric("key rate", fmtRate(row.key_rate_bps), "key-rate", row.key_rate_bps),
        metric("QBER", fmtPct(row.qber), "qber", row.qber),
        el("div", { class: "metric fill", "data-value": fill },
          el("div", { class: "label", text: "key store" }),
          el("div", { class: "value", text: row.keys_available + " keys · " + fmtPct(fill, 1) }),
          el("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 1, "aria-valuenow": fill,
            "aria-label": "key store fill" }, el("span", { style: "width:" + (100 * fill).toFixed(1) + "%" }))),
        metric("auth balance", fmtBits(row.auth_balance_bits), "auth", row.auth_balance_bits),
        metric("last block", row.last_block_id === null ? "–" :
          "#" + row.last_block_id + " · " + fmtAge(row.seconds_since_last_block) + " ago", "last-block", row.last_block_id)),
      alarms);
  }
  function renderOverview(ov) {
    const cards = ov.links.map((r) => linkCard(r, true));
    app.replaceChildren(el("h1", { text: "Overview" }),
      el("div", { class: "cards", id: "links" }, ...(cards.length ? cards : [el("p", { text: "no link" })])));
  }

  // ---- charts -----------------------------------------------------------------------
  const PALETTE = ["#0b6bcb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#1098ad"];
  const DASH = [[], [6, 3], [2, 2], [8, 2, 2, 2]];
  // x range of the link page's plots: from the oldest point shown to now (sparse series,
  // such as sync events, then share the time axis of the dense ones)
  let X0 = null;
  function chart(container, title, labels, data, opts) {
    opts = opts || {};
    const width = Math.max(280, container.clientWidth - 4);
    const series = [{}].concat(labels.map((l, i) => ({
      label: l, stroke: PALETTE[i % PALETTE.length], width: 1.5, dash: DASH[i % DASH.length],
      points: { show: opts.points || false, size: 5 }, spanGaps: false,
      scale: opts.scales ? opts.scales[i] : "y",
    })));
    const fmt = (v) => (opts.fmt ? opts.fmt(v) : fixed(v));
    const axes = [{}, { scale: opts.scales ? opts.scales[0] : "y", values: (u, vals) => vals.map(fmt), size: opts.axisSize || 80 }];
    if (opts.scales && opts.scales.length > 1) {
      axes.push({ scale: opts.scales[1], side: 1, grid: { show: false }, size: 60,
        values: (u, vals) => vals.map((v) => fixed(v)) });
    }
    const u = new uPlot({
      title: title, width: width, height: 200, series: series,
      scales: { x: { time: true, range: (u, min, max) => [X0 === null ? min : Math.min(min, X0), Math.max(max, now())] } },
      axes: axes, legend: { live: true },
    }, data, container);
    container.dataset.points = String(data[0].length);
    return u;
  }

  // ---- link page --------------------------------------------------------------------
  let linkState = null;
  async function renderLink() {
    const [ov, series, blocks, events, plots] = await Promise.all([
      getJSON("/api/overview"),
      getJSON("/api/links/" + encodeURIComponent(LINK) + "/series?hours=24"),
      getJSON("/api/links/" + encodeURIComponent(LINK) + "/blocks?limit=200"),
      getJSON("/api/links/" + encodeURIComponent(LINK) + "/events"),
      getJSON("/api/links/" + encodeURIComponent(LINK) + "/plots"),
    ]);
    const row = ov.links.find((r) => r.link === LINK);
    const summary = el("div", { id: "summary" }, row ? linkCard(row, false) : el("p", { text: "no status yet" }));
    const actions = el("div", { class: "actions" });
    for (const a of ["start", "stop", "calibrate", "recover"]) {
      actions.append(el("button", { type: "button", "data-action": a, disabled: ROLE !== "operator",
        title: ROLE !== "operator" ? "needs the operator role" : a + " the link", onclick: () => act(a) }, a));
    }
    const actionMsg = el("span", { id: "action-result", class: "muted", role: "status" });
    const base = "/api/links/" + encodeURIComponent(LINK) + "/export.csv?hours=168&table=";
    const csv = el("p", { class: "csv" }, "CSV: ",
      ...["samples", "blocks", "alarms", "events"].map((t) => el("a", { href: base + t, download: true, text: t + " " })));
    const charts = el("div", { class: "charts" });
    const panels = {};
    for (const id of ["rate", "qber", "fill", "detectors", "sync"]) {
      panels[id] = el("div", { class: "chart", id: "chart-" + id });
      charts.append(panels[id]);
    }
    const blockTable = el("table", { id: "blocks" });
    const calTable = el("table", { id: "calibrations" });
    app.replaceChildren(el("h1", { text: "Link " + LINK }), summary,
      el("div", { class: "toolbar" }, actions, actionMsg), charts,
      el("h2", { text: "Key blocks" }), el("div", { class: "scroll" }, blockTable),
      el("h2", { text: "Calibration and synchronisation" }), el("div", { class: "scroll" }, calTable),
      el("div", { class: "plots", id: "calibration-plots" }, ...plots.plots.map((p) =>
        el("figure", {}, el("img", { src: "/api/links/" + encodeURIComponent(LINK) + "/plots/" + p.procedure + ".png?t=" + Math.round(p.mtime_s),
          alt: "latest " + p.procedure + " calibration plot", loading: "lazy" }),
          el("figcaption", { text: p.procedure + " · " + fmtTime(p.mtime_s) })))), csv);

    linkState = { series, blocks: blocks.blocks, events: events.events, panels, blockTable, calTable, summary, plots: {} };
    drawLinkCharts();
    drawBlocks();
    drawEvents();
  }
  function drawLinkCharts() {
    const s = linkState;
    const p = s.plots;
    for (const k of Object.keys(p)) p[k].destroy();
    const sr = s.series;
    const firsts = [sr.ts_s[0], s.blocks.length ? s.blocks[0].ts_s : undefined, s.events.length ? s.events[0].ts_s : undefined]
      .filter((x) => x !== undefined);
    X0 = firsts.length ? Math.min(...firsts) : null;
    p.rate = chart(s.panels.rate, "Secret key rate (b/s)", ["key rate"], [sr.ts_s, sr.key_rate_bps], { fmt: (v) => fmtRate(v) });
    p.qber = chart(s.panels.qber, "QBER per basis (%) by block", ["Z", "X"], qberData(sr), { points: sr.block_ts_s.length < 300 });
    p.fill = chart(s.panels.fill, "Key store fill (%)", ["fill"], [sr.ts_s, sr.fill_ratio.map((x) => (x === null ? null : 100 * x))]);
    const det = sr.detector_rates_hz;
    p.detectors = chart(s.panels.detectors, "Detection rate per detector (Hz)",
      det.length ? det.map((_, i) => "D" + i) : ["(no detectors)"],
      [sr.ts_s].concat(det.length ? det : [sr.ts_s.map(() => null)]), { fmt: (v) => fmtHz(v) });
    const sync = s.events.filter((e) => e.topic === "sync" || e.topic === "sync.acquired");
    p.sync = chart(s.panels.sync, "Sync: clock offset (ps, left) and frequency (ppm, right)", ["offset ps", "ppm"],
      anchored([sync.map((e) => e.ts_s), sync.map((e) => num(e.payload.offset_ps)), sync.map((e) => num(e.payload.ppm))]),
      { points: true, scales: ["ps", "ppm"], fmt: fmtPs, axisSize: 100 });
  }
  // a sparse series between empty points at the page's start and now, so that its time
  // axis is the other plots' even with one point
  function anchored(data) {
    if (X0 === null) return data;
    return data.map((col, i) => (i === 0 ? [Math.min(X0, col[0] ?? X0)].concat(col, [now()]) : [null].concat(col, [null])));
  }
  function pct(x) { return x === null ? null : 100 * x; }
  function qberData(sr) {
    return [sr.block_ts_s, sr.qber_z.map(pct), sr.qber_x.map(pct)];
  }
  function num(x) { return typeof x === "number" && isFinite(x) ? x : null; }
  function drawBlocks() {
    const s = linkState;
    const head = el("tr", {}, ...["block", "time", "result", "QBER Z", "QBER X", "detections", "sifted Z",
      "disclosed", "leak (λ_EC)", "f (EC)", "final key", "ε_sec / ε_cor", "forgery ≤", "post-proc."].map((h) => el("th", { scope: "col", text: h })));
    const rows = s.blocks.slice().reverse().slice(0, 200).map((b) => {
      const st = b.stats;
      const forgery = typeof st.auth_forgery_bound === "number" ? st.auth_forgery_bound.toExponential(1) : "–";
      return el("tr", { "data-block": b.block_id, class: b.ok ? "" : "aborted" },
        el("td", { text: "#" + b.block_id }), el("td", { text: fmtTime(b.ts_s) }),
        el("td", {}, b.ok ? el("span", { class: "badge ok", text: "✔ ok" }) : el("span", { class: "badge bad", text: "✖ aborted" })),
        el("td", { text: fmtPct(b.qber_z) }), el("td", { text: fmtPct(b.qber_x) }),
        el("td", { text: b.detections.toLocaleString() }), el("td", { text: b.sifted_z.toLocaleString() }),
        el("td", { text: fmtBits(b.ec_disclosed_bits) }),
        el("td", { text: typeof st.leak_total_bits === "number" ? fmtBits(st.leak_total_bits) : "–" }),
        el("td", { text: typeof st.ec_efficiency === "number" ? st.ec_efficiency.toFixed(3) : "–" }),
        el("td", { text: fmtBits(b.final_key_bits) }),
        el("td", { text: typeof st.eps_sec === "number" && typeof st.eps_cor === "number"
          ? st.eps_sec.toExponential(0) + " / " + st.eps_cor.toExponential(0) : "–" }),
        el("td", { text: forgery }),
        el("td", { text: b.block_seconds.toFixed(2) + " s" }));
    });
    s.blockTable.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
    s.blockTable.dataset.rows = String(rows.length);
  }
  function drawEvents() {
    const s = linkState;
    const head = el("tr", {}, ...["time", "what", "result", "details"].map((h) => el("th", { scope: "col", text: h })));
    const rows = s.events.slice().reverse().slice(0, 100).map((e) => {
      const p = e.payload;
      const ok = p.ok === undefined ? p.locked : p.ok;
      const details = Object.entries(p).filter(([k, v]) => typeof v === "number" || (typeof v === "string" && v.length < 80))
        .slice(0, 8).map(([k, v]) => k + "=" + (typeof v === "number" ? +v.toPrecision(4) : v)).join("  ");
      return el("tr", {}, el("td", { text: fmtTime(e.ts_s) }), el("td", { text: e.topic }),
        el("td", {}, ok === false ? el("span", { class: "badge bad", text: "✖ failed" }) : el("span", { class: "badge ok", text: "✔" })),
        el("td", { class: "mono", text: details }));
    });
    s.calTable.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  }
  async function act(action) {
    const msg = document.getElementById("action-result");
    msg.textContent = action + "…";
    try {
      const r = await fetch("/api/links/" + encodeURIComponent(LINK) + "/actions/" + action, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-Console-Token": TOKEN }, body: "{}",
      });
      const data = await r.json();
      msg.textContent = r.ok ? action + ": " + (data.state || "done") : action + " refused: " + data.message;
    } catch (e) {
      msg.textContent = action + " failed: " + e;
    }
  }

  // ---- alarms page ------------------------------------------------------------------
  let alarmData = null;
  async function renderAlarms() {
    alarmData = await getJSON("/api/alarms");
    drawAlarms();
  }
  function drawAlarms() {
    const a = alarmData;
    const active = a.active.length
      ? el("table", { id: "active-alarms" }, el("thead", {}, el("tr", {}, ...["link", "severity", "alarm", "since", "cause"].map((h) => el("th", { scope: "col", text: h })))),
          el("tbody", {}, ...a.active.map((x) => el("tr", { class: "alarm", "data-alarm": x.name, "data-link": x.link },
            el("td", { text: x.link }), el("td", {}, sevBadge(x.severity)), el("td", { text: x.name }),
            el("td", { text: fmtTime(x.since_s) + " (" + fmtAge(now() - x.since_s) + ")" }), el("td", { text: x.cause })))))
      : el("p", { id: "active-alarms", class: "muted", text: "no active alarm" });
    const events = el("table", { id: "alarm-events" },
      el("thead", {}, el("tr", {}, ...["time", "link", "event", "severity", "alarm", "cause"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...a.events.slice(0, 500).map((x) => el("tr", { class: "event-" + x.event, "data-alarm": x.name },
        el("td", { text: fmtTime(x.ts_s) }), el("td", { text: x.link }),
        el("td", {}, x.event === "raise" ? el("span", { class: "badge bad", text: "▲ raise" }) : el("span", { class: "badge ok", text: "▼ clear" })),
        el("td", {}, sevBadge(x.severity)), el("td", { text: x.name }), el("td", { text: x.cause })))));
    app.replaceChildren(el("h1", { text: "Alarms" }), el("h2", { text: "Active" }), active,
      el("h2", { text: "Raise and clear history (7 days)" }), el("div", { class: "scroll" }, events));
  }

  // ---- network page -----------------------------------------------------------------
  function renderNetwork(view) {
    const sites = view.sites;
    const W = 640, H = 420, R = 160, cx = W / 2, cy = H / 2;
    const pos = {};
    sites.forEach((s, i) => {
      const a = (2 * Math.PI * i) / sites.length - Math.PI / 2;
      pos[s] = [cx + R * Math.cos(a), cy + R * Math.sin(a)];
    });
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "network map of " + view.site);
    svg.id = "network-map";
    const mk = (tag, attrs, text) => {
      const e = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.append(e);
      return e;
    };
    const routeLinks = new Set(view.routes.flatMap((r) => r.links));
    for (const l of view.links) {
      const [x1, y1] = pos[l.a.site] || [0, 0];
      const [x2, y2] = pos[l.b.site] || [0, 0];
      const cls = l.usable ? (l.avoided ? "warn" : "ok") : "bad";
      mk("line", { x1, y1, x2, y2, class: "net-link " + cls + (routeLinks.has(l.link_id) ? " route" : ""),
        "stroke-dasharray": l.usable ? "" : "6 4", "data-link": l.link_id });
      const level = Math.min(l.a.level_bits, l.b.level_bits);
      mk("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "net-label", "text-anchor": "middle" },
        l.link_id + (l.usable ? "" : " ✖") + " · " + fmtBits(level));
    }
    for (const s of sites) {
      const [x, y] = pos[s];
      const heard = view.sites_heard.includes(s) || s === view.site;
      mk("circle", { cx: x, cy: y, r: s === view.site ? 20 : 15, class: "net-site " + (heard ? "ok" : "bad") + (s === view.site ? " here" : "") });
      mk("text", { x, y: y + 34, class: "net-name", "text-anchor": "middle" }, s + (heard ? "" : " (not heard)"));
    }
    const local = el("table", { id: "local-links" },
      el("thead", {}, el("tr", {}, ...["link", "peer", "state", "usable", "level", "held", "rate", "relayed out/in"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...view.local_links.map((l) => el("tr", { "data-link": l.link_id },
        el("td", {}, el("a", { href: "/links/" + encodeURIComponent(l.link_id), text: l.link_id })), el("td", { text: l.peer }),
        el("td", {}, stateBadge(l.state, false)), el("td", { text: l.usable ? "✔ yes" : "✖ no" }),
        el("td", { text: fmtBits(l.level_bits) }), el("td", { text: fmtBits(l.held_bits) }), el("td", { text: fmtRate(l.rate_bps) }),
        el("td", { text: fmtBits(l.relay_out_bits) + " / " + fmtBits(l.relay_in_bits) })))));
    const routes = el("ul", { id: "routes" }, ...view.routes.map((r) => el("li", {}, el("b", { text: r.destination }), ": " + r.path.join(" → "))));
    app.replaceChildren(el("h1", { text: "Network (" + view.site + ")" }),
      el("p", { class: "muted", text: "as of " + fmtTime(view.at_unix_s) + " · relays: " + view.relays.landed + " landed, " + view.relays.failed + " failed" }),
      el("div", { class: "map" }, svg), el("h2", { text: "This site's links" }), el("div", { class: "scroll" }, local),
      el("h2", { text: "Relay routes" }), routes);
  }

  // ---- boot -------------------------------------------------------------------------
  async function boot() {
    try {
      if (PAGE === "overview") {
        renderOverview(await getJSON("/api/overview"));
        on("overview", renderOverview);
      } else if (PAGE === "link") {
        await renderLink();
        on("overview", (ov) => {
          const row = ov.links.find((r) => r.link === LINK);
          if (!row || !linkState) return;
          linkState.summary.replaceChildren(linkCard(row, false));
          const sr = linkState.series;
          sr.ts_s.push(ov.ts_s); sr.key_rate_bps.push(row.key_rate_bps); sr.fill_ratio.push(row.fill_ratio);
          sr.qber.push(row.qber); sr.keys_available.push(row.keys_available); sr.auth_balance_bits.push(row.auth_balance_bits);
          for (const d of sr.detector_rates_hz) d.push(null);
          linkState.plots.rate.setData([sr.ts_s, sr.key_rate_bps]);
          linkState.panels.rate.dataset.points = String(sr.ts_s.length);
          linkState.plots.fill.setData([sr.ts_s, sr.fill_ratio.map((x) => (x === null ? null : 100 * x))]);
        });
        on("block", (b) => {
          if (b.link !== LINK || !linkState) return;
          linkState.blocks.push(b);
          drawBlocks();
          const sr = linkState.series;
          sr.block_ts_s.push(b.ts_s); sr.qber_z.push(b.qber_z); sr.qber_x.push(b.qber_x); sr.final_key_bits.push(b.final_key_bits);
          linkState.plots.qber.setData(qberData(sr));
          linkState.panels.qber.dataset.points = String(sr.block_ts_s.length);
        });
        on("event", (e) => {
          if (e.link !== LINK || !linkState) return;
          linkState.events.push(e);
          drawEvents();
        });
      } else if (PAGE === "alarms") {
        await renderAlarms();
        on("alarm", (a) => { if (alarmData) { alarmData.events.unshift(a); } });
        on("overview", (ov) => {
          if (!alarmData) return;
          alarmData.active = ov.links.flatMap((r) => r.alarms.map((x) => Object.assign({ link: r.link }, x)));
          drawAlarms();
        });
      } else if (PAGE === "network") {
        renderNetwork(await getJSON("/api/network"));
        on("network", renderNetwork);
      }
      body.dataset.ready = "1";
    } catch (e) {
      app.replaceChildren(el("h1", { text: "Error" }), el("p", { class: "error", text: String(e) }));
    }
    connect();
  }
  boot();
})();
