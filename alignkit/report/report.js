// alignkit run report: draws the figures alignkit.report computed (inline SVG) and pages through the pairs.
// Self-contained on purpose: no library, nothing fetched. Data text is set with textContent, never as HTML.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const PAGE = 50;

  // -- small DOM helpers ------------------------------------------------------------------------
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children || []) if (c) node.appendChild(c);
    return node;
  }
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    const a = Math.abs(x);
    return a >= 1000 ? x.toFixed(0) : a >= 1 ? x.toFixed(2) : a >= 0.001 ? x.toFixed(3) : x.toExponential(1);
  }
  function tick(v, lo, hi) {
    // enough digits that the ticks of a narrow range differ
    const span = Math.abs(hi - lo), digits = span > 0 ? Math.max(0, Math.ceil(-Math.log10(span)) + 1) : 2;
    if (Math.abs(v) >= 1e4) return v.toPrecision(3);
    if (v !== 0 && Math.abs(v) < 1e-3 && digits > 4) return v.toExponential(2);
    return v.toFixed(Math.min(digits, 6));
  }
  function empty(text) { return el("p", { class: "empty", text: text }); }
  function card(title, body) { return el("div", { class: "card" }, [el("h4", { text: title }), body]); }
  function kvTable(rows) {
    return el("table", { class: "kv" }, rows.filter(r => r).map(([k, v]) =>
      el("tr", {}, [el("td", { text: k }), el("td", { text: fmt(v) })])));
  }
  function niceRange(lo, hi) {
    if (!(hi > lo)) { const pad = Math.abs(lo) * 0.1 || 1; return [lo - pad, hi + pad]; }
    const pad = (hi - lo) * 0.05;
    return [lo - pad, hi + pad];
  }

  // -- charts -----------------------------------------------------------------------------------
  const W = 300, H = 150, M = { l: 52, r: 8, t: 8, b: 28 };
  function frame(w, h) {
    const svg = svgEl("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    svg.appendChild(svgEl("line", { class: "axis", x1: M.l, y1: h - M.b, x2: w - M.r, y2: h - M.b }));
    svg.appendChild(svgEl("line", { class: "axis", x1: M.l, y1: M.t, x2: M.l, y2: h - M.b }));
    return svg;
  }
  function scale(d0, d1, r0, r1) { return v => r0 + (v - d0) / (d1 - d0 || 1) * (r1 - r0); }
  function yTicks(svg, y, lo, hi, integers) {
    const mid = integers ? Math.round((lo + hi) / 2) : (lo + hi) / 2;
    for (const v of [...new Set([lo, mid, hi])]) {
      svg.appendChild(svgEl("text", { x: M.l - 4, y: y(v) + 3, "text-anchor": "end" }, integers ? String(v) : tick(v, lo, hi)));
    }
  }

  function histogramChart(hist, xlabel) {
    const svg = frame(W, H);
    const counts = hist.counts, edges = hist.edges, max = Math.max(1, ...counts);
    const x = scale(edges[0], edges[edges.length - 1], M.l, W - M.r), y = scale(0, max, H - M.b, M.t);
    counts.forEach((c, i) => {
      const x0 = x(edges[i]), x1 = x(edges[i + 1]);
      const bar = svgEl("rect", { class: "bar", x: x0 + 1, y: y(c), width: Math.max(1, x1 - x0 - 2), height: H - M.b - y(c) });
      bar.appendChild(svgEl("title", {}, `${fmt(edges[i])} – ${fmt(edges[i + 1])}: ${c}`));
      svg.appendChild(bar);
    });
    yTicks(svg, y, 0, max, true);
    for (const v of [edges[0], edges[edges.length - 1]]) {
      svg.appendChild(svgEl("text", { x: x(v), y: H - M.b + 12, "text-anchor": "middle" }, fmt(v)));
    }
    svg.appendChild(svgEl("text", { x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle" }, xlabel));
    return svg;
  }

  function barList(entries, unit) {
    // horizontal bars: [[label, value], ...]
    if (!entries.length) return empty("nothing to show");
    const rowH = 18, labelW = 230, w = 520, h = entries.length * rowH + 8;
    const max = Math.max(...entries.map(e => e[1]), 1e-9);
    const svg = svgEl("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    entries.forEach(([label, value], i) => {
      const y = 4 + i * rowH, bw = (w - labelW - 60) * value / max;
      svg.appendChild(svgEl("text", { x: labelW - 6, y: y + 12, "text-anchor": "end" }, label.length > 40 ? label.slice(0, 39) + "…" : label));
      const bar = svgEl("rect", { class: "bar", x: labelW, y: y + 2, width: Math.max(1, bw), height: rowH - 5 });
      bar.appendChild(svgEl("title", {}, `${label}: ${fmt(value)}${unit || ""}`));
      svg.appendChild(bar);
      svg.appendChild(svgEl("text", { x: labelW + bw + 4, y: y + 12 }, fmt(value) + (unit || "")));
    });
    return svg;
  }

  function lineChart(points) {
    const svg = frame(W, H);
    const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = niceRange(Math.min(...ys), Math.max(...ys));
    const x = scale(x0, x1 === x0 ? x0 + 1 : x1, M.l, W - M.r), y = scale(y0, y1, H - M.b, M.t);
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    svg.appendChild(svgEl("path", { class: "line", d: d }));
    if (points.length === 1) svg.appendChild(svgEl("circle", { class: "dot", cx: x(xs[0]), cy: y(ys[0]), r: 3 }));
    yTicks(svg, y, y0, y1);
    svg.appendChild(svgEl("text", { x: M.l, y: H - M.b + 12, "text-anchor": "middle" }, fmt(x0)));
    svg.appendChild(svgEl("text", { x: W - M.r, y: H - M.b + 12, "text-anchor": "end" }, fmt(x1)));
    svg.appendChild(svgEl("text", { x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
    return svg;
  }

  function scatterChart(points, xlabel, ylabel) {
    const svg = frame(W, W * 0.75);
    const h = W * 0.75, all = points.flat(), hi = Math.max(1, ...all);
    const x = scale(0, hi, M.l, W - M.r), y = scale(0, hi, h - M.b, M.t);
    svg.appendChild(svgEl("line", { class: "diag", x1: x(0), y1: y(0), x2: x(hi), y2: y(hi) }));
    for (const [a, b] of points) svg.appendChild(svgEl("circle", { class: "dot", cx: x(a), cy: y(b), r: 2.5 }));
    yTicks(svg, y, 0, hi, true);
    svg.appendChild(svgEl("text", { x: W - M.r, y: h - M.b + 12, "text-anchor": "end" }, fmt(hi)));
    svg.appendChild(svgEl("text", { x: (M.l + W - M.r) / 2, y: h - 4, "text-anchor": "middle" }, xlabel));
    svg.appendChild(svgEl("text", { x: 10, y: (h - M.b) / 2, transform: `rotate(-90 10 ${(h - M.b) / 2})`, "text-anchor": "middle" }, ylabel));
    return svg;
  }

  function intervalChart(metric, labels) {
    // one dot per evaluation, with its interval as a whisker where results.json has one
    const w = 260, rowH = 20, h = labels.length * rowH + 24, left = 70;
    const vals = [];
    labels.forEach(l => {
      if (metric.values[l] !== null && metric.values[l] !== undefined) vals.push(metric.values[l]);
      if (metric.ci[l]) vals.push(...metric.ci[l]);
    });
    const [lo, hi] = niceRange(Math.min(...vals), Math.max(...vals));
    const x = scale(lo, hi, left, w - 10);
    const svg = svgEl("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    svg.appendChild(svgEl("line", { class: "axis", x1: left, y1: h - 18, x2: w - 10, y2: h - 18 }));
    labels.forEach((l, i) => {
      const yy = 10 + i * rowH, v = metric.values[l];
      svg.appendChild(svgEl("text", { x: left - 6, y: yy + 4, "text-anchor": "end" }, l));
      if (metric.ci[l]) svg.appendChild(svgEl("line", { class: "ci", x1: x(metric.ci[l][0]), y1: yy, x2: x(metric.ci[l][1]), y2: yy }));
      if (v !== null && v !== undefined) svg.appendChild(svgEl("circle", { class: "dot", cx: x(v), cy: yy, r: 4 }));
    });
    svg.appendChild(svgEl("text", { x: left, y: h - 6, "text-anchor": "middle" }, fmt(lo)));
    svg.appendChild(svgEl("text", { x: w - 10, y: h - 6, "text-anchor": "end" }, fmt(hi)));
    return svg;
  }

  // -- sections ---------------------------------------------------------------------------------
  function header() {
    document.getElementById("run-title").textContent = DATA.title;
    document.getElementById("run-meta").textContent = `${DATA.root} · generated ${DATA.generated} · ${DATA.rounds.length} round(s) · ${DATA.pairs.length} pairs`;
    document.getElementById("recipe-text").textContent = DATA.recipe || "(no recipe.yaml in the run directory)";
  }

  function stages() {
    const host = document.getElementById("stages");
    const timed = DATA.stages.filter(s => typeof s.seconds === "number");
    if (!timed.length) { host.appendChild(empty("No stage has finished yet.")); return; }
    const total = timed.reduce((a, s) => a + s.seconds, 0);
    host.appendChild(card(`seconds per stage (${fmt(total)} s in all)`, barList(timed.map(s => [s.key, s.seconds]), " s")));
    const unfinished = DATA.stages.filter(s => s.status !== "done").map(s => `${s.key} (${s.status})`);
    if (unfinished.length) host.appendChild(el("p", { class: "empty", text: "Not finished: " + unfinished.join(", ") }));
  }

  function samplesCard(s) {
    if (!s) return card("samples", empty("No samples in this round."));
    return card("samples", kvTable([["answers", s.total], ["prompts", s.prompts], ["truncated (max_new_tokens)", s.truncated],
      ["final answer not found", s.unparsed], ["mean tokens", s.mean_tokens], ["exact repeats", s.duplicates],
      ["prompts that failed", s.failed_prompts]]));
  }

  function judgeCards(j) {
    if (!j) return [card("judge", empty("No verdicts in this round."))];
    const cards = [card("verdicts", kvTable([["total", j.total], ["ok", j.ok], ["failed", j.total - j.ok]]))];
    for (const [name, d] of Object.entries(j.scores)) {
      cards.push(card(`${name === "score" ? "combined score" : name}: n ${d.n}, mean ${fmt(d.mean)}`,
        d.n ? histogramChart(d, name) : empty("no ok verdicts")));
    }
    const failures = Object.entries(j.failures).sort((a, b) => b[1] - a[1]);
    cards.push(card("failure reasons", failures.length ? barList(failures) : empty("No verdict failed.")));
    const sc = j.self_consistency, pos = j.position, ra = j.reference_agreement;
    cards.push(card("judge consistency", el("div", {}, [
      sc ? kvTable([["self-consistency: samples", sc.samples], ["mean |difference|", sc.mean_abs_diff], ["all judgments equal", sc.exact_agreement]])
        : empty("Self-consistency not measured (judge.num_judgments = 1)."),
      pos ? kvTable([["position: pairs compared", pos.comparisons], ["both orders agree", pos.consistency], ["ties", pos.ties], ["first position picked", pos.first_position_rate]])
        : empty("Position consistency not measured (not a pairwise judge)."),
      ra ? kvTable([["agreement with reference: samples", ra.samples], ["Spearman", ra.spearman], ["pairwise agreement", ra.pairwise_agreement]]) : null,
    ])));
    return cards;
  }

  function pairCards(p) {
    if (!p) return [card("pairs", empty("No pairs in this round."))];
    const skipped = Object.entries(p.skipped || {});
    const L = p.length;
    return [
      card("pairs", el("div", {}, [kvTable([["pairs", p.count], ["prompts with a pair", p.prompts_with_pairs], ["mean margin", p.margin.mean]]),
        el("h4", { text: "skipped" }), skipped.length ? barList(skipped) : empty("Nothing was skipped.")])),
      card("margin (chosen − rejected score)", p.count ? histogramChart(p.margin, "margin") : empty("No pairs.")),
      card(`length bias: chosen vs rejected (${L.unit})`, p.count ? el("div", {}, [
        scatterChart(L.points, `rejected (${L.unit})`, `chosen (${L.unit})`),
        kvTable([["mean chosen", L.chosen_mean], ["mean rejected", L.rejected_mean], ["chosen longer", L.chosen_longer], ["same length", p.count - L.chosen_longer - L.chosen_shorter],
          ["chosen shorter", L.chosen_shorter]]),
      ]) : empty("No pairs.")),
    ];
  }

  function rounds() {
    const host = document.getElementById("rounds");
    for (const r of DATA.rounds) {
      host.appendChild(el("h2", { text: `Round ${r.round}: samples, judge, pairs` }));
      host.appendChild(el("div", { class: "grid" }, [samplesCard(r.samples), ...judgeCards(r.judge), ...pairCards(r.pairs)]));
    }
  }

  function curveCards(title, curves) {
    const entries = Object.entries(curves || {});
    return [el("h3", { text: title }), entries.length
      ? el("div", { class: "grid" }, entries.map(([k, pts]) => card(k, lineChart(pts))))
      : empty("No training metrics (the stage has not run, or logged no step).")];
  }

  function training() {
    const host = document.getElementById("train-curves");
    if (DATA.sft) curveCards("SFT", DATA.sft).forEach(n => host.appendChild(n));
    for (const r of DATA.rounds) {
      if (r.reward_model) curveCards(`Round ${r.round}: reward model`, r.reward_model).forEach(n => host.appendChild(n));
      curveCards(`Round ${r.round}: policy training`, r.train).forEach(n => host.appendChild(n));
    }
  }

  function evaluation() {
    const host = document.getElementById("eval-body"), ev = DATA.eval;
    if (!ev) { host.appendChild(empty("No evaluation in this run (add an `eval` section and the `eval` stage).")); return; }
    const labels = ev.labels, first = labels[0], last = labels[labels.length - 1];
    function table(metrics) {
      const head = el("tr", {}, [el("th", { text: "metric" }), ...labels.map(l => el("th", { text: l })),
        labels.length > 1 ? el("th", { text: `${last} − ${first}` }) : null]);
      const rows = metrics.map(m => el("tr", {}, [el("td", { text: m.name }), ...labels.map(l => {
        const ci = m.ci[l];
        return el("td", { text: fmt(m.values[l]) + (ci ? ` [${fmt(ci[0])}, ${fmt(ci[1])}]` : "") });
      }), labels.length > 1 ? el("td", { text: (typeof m.values[first] === "number" && typeof m.values[last] === "number")
        ? (m.values[last] - m.values[first] >= 0 ? "+" : "") + fmt(m.values[last] - m.values[first]) : "–" }) : null]));
      return el("table", { class: "data" }, [head, ...rows]);
    }
    // the rates (with their intervals) in view; the counts they come from (answers, tp, total, ...) folded
    const rates = ev.metrics.filter(m => !m.count), counts = ev.metrics.filter(m => m.count);
    host.appendChild(rates.length ? table(rates) : empty("No rates in results.json."));
    if (!ev.metrics.some(m => Object.keys(m.ci).length)) host.appendChild(empty("results.json has no intervals (no *_ci keys)."));
    if (counts.length) host.appendChild(el("details", {}, [el("summary", { text: `counts (${counts.length})` }), table(counts)]));
    host.appendChild(el("div", { class: "grid" }, rates.map(m => card(m.name, intervalChart(m, labels)))));
  }

  function cost() {
    const host = document.getElementById("cost-body");
    if (!DATA.cost.length) { host.appendChild(empty("No judge stage has run.")); return; }
    const cols = [["round", "round"], ["judge", "judge"], ["requests", "requests"], ["cached", "cached"], ["requests/s", "request_rate"],
      ["prompt tokens", "prompt_tokens"], ["completion tokens", "completion_tokens"], ["cost", "cost"]];
    host.appendChild(el("table", { class: "data" }, [el("tr", {}, cols.map(c => el("th", { text: c[0] }))),
      ...DATA.cost.map(r => el("tr", {}, cols.map(c => el("td", { text: fmt(r[c[1]]) }))))]));
    if (DATA.cost.every(r => r.cost === null || r.cost === undefined)) host.appendChild(empty("Cost unknown: the judge file has no `price` (the reference judge is free)."));
  }

  // -- pair viewer ------------------------------------------------------------------------------
  const viewer = { rows: [], page: 0 };
  const haystack = DATA.pairs.map(p => [p.prompt_id, p.question, p.chosen, p.rejected, p.chosen_rationale, p.rejected_rationale].join("\n").toLowerCase());
  const SORTS = {
    "margin-desc": (a, b) => b.margin - a.margin,
    "margin-asc": (a, b) => a.margin - b.margin,
    "chosen-desc": (a, b) => b.chosen_score - a.chosen_score,
    "rejected-asc": (a, b) => a.rejected_score - b.rejected_score,
    "prompt": (a, b) => a.prompt_id < b.prompt_id ? -1 : a.prompt_id > b.prompt_id ? 1 : 0,
    "round": (a, b) => a.round - b.round,
  };
  function num(id) { const v = document.getElementById(id).value; return v === "" ? null : Number(v); }

  function applyFilters() {
    const q = document.getElementById("f-search").value.trim().toLowerCase();
    const round = document.getElementById("f-round").value, prompt = document.getElementById("f-prompt").value.trim();
    const mMin = num("f-margin-min"), mMax = num("f-margin-max"), cMin = num("f-chosen-min"), rMax = num("f-rejected-max");
    const idx = [];
    DATA.pairs.forEach((p, i) => {
      if (round && String(p.round) !== round) return;
      if (prompt && !p.prompt_id.includes(prompt)) return;
      if (mMin !== null && !(p.margin >= mMin)) return;
      if (mMax !== null && !(p.margin <= mMax)) return;
      if (cMin !== null && !(p.chosen_score >= cMin)) return;
      if (rMax !== null && !(p.rejected_score <= rMax)) return;
      if (q && !haystack[i].includes(q)) return;
      idx.push(i);
    });
    const sort = SORTS[document.getElementById("f-sort").value];
    idx.sort((a, b) => sort(DATA.pairs[a], DATA.pairs[b]) || a - b);
    viewer.rows = idx;
    viewer.page = 0;
    renderPage();
  }

  function side(kind, text, score, rationale, tokens) {
    return el("div", { class: `side ${kind}` }, [
      el("strong", { text: `${kind} · score ${fmt(score)}${tokens !== null && tokens !== undefined ? ` · ${tokens} tokens` : ""}` }),
      el("pre", { text: text }),
      el("div", { class: "rationale", text: rationale ? `judge: ${rationale}` : "judge: (no rationale)" }),
    ]);
  }

  function pairRow(p) {
    const images = p.images.map(k => k && DATA.images[k]
      ? el("img", { src: DATA.images[k], alt: `image of ${p.prompt_id}` })
      : el("div", { class: "noimg", text: "image not found" }));
    return el("div", { class: "pair" }, [
      el("div", { class: "pair-head" }, [...images, el("div", {}, [
        el("div", { class: "pair-meta", text: `round ${p.round} · prompt ${p.prompt_id} · margin ${fmt(p.margin)}` }),
        el("div", { class: "question", text: p.question }),
      ])]),
      el("div", { class: "sides" }, [
        side("chosen", p.chosen, p.chosen_score, p.chosen_rationale, p.chosen_tokens),
        side("rejected", p.rejected, p.rejected_score, p.rejected_rationale, p.rejected_tokens),
      ]),
    ]);
  }

  function renderPage() {
    const host = document.getElementById("pair-rows"), n = viewer.rows.length;
    const pages = Math.max(1, Math.ceil(n / PAGE));
    viewer.page = Math.min(Math.max(0, viewer.page), pages - 1);
    const start = viewer.page * PAGE, shown = viewer.rows.slice(start, start + PAGE);
    host.replaceChildren(...shown.map(i => pairRow(DATA.pairs[i])));
    if (!DATA.pairs.length) host.appendChild(empty("No pairs in this run yet."));
    else if (!n) host.appendChild(empty("No pair matches the filters."));
    const count = document.getElementById("pair-count");
    count.textContent = n ? `pairs ${start + 1}–${start + shown.length} of ${n} matching (${DATA.pairs.length} in all)` : `0 of ${DATA.pairs.length} pairs match`;
    count.dataset.matching = String(n);
    document.getElementById("page-prev").disabled = viewer.page === 0;
    document.getElementById("page-next").disabled = viewer.page >= pages - 1;
  }

  function pairViewer() {
    const rounds = document.getElementById("f-round");
    for (const r of DATA.rounds) rounds.appendChild(el("option", { value: String(r.round), text: String(r.round) }));
    let timer = null;
    document.getElementById("f-search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(applyFilters, 120); });
    for (const id of ["f-round", "f-prompt", "f-margin-min", "f-margin-max", "f-chosen-min", "f-rejected-max", "f-sort"]) {
      document.getElementById(id).addEventListener(id.startsWith("f-round") || id === "f-sort" ? "change" : "input", applyFilters);
    }
    document.getElementById("page-prev").addEventListener("click", () => { viewer.page--; renderPage(); });
    document.getElementById("page-next").addEventListener("click", () => { viewer.page++; renderPage(); });
    applyFilters();
  }

  header();
  stages();
  rounds();
  training();
  evaluation();
  cost();
  pairViewer();
  document.body.dataset.ready = "true";
})();
