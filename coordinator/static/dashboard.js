// Polls v1/status every 2 s and draws it with Chart.js (vendored beside this file).
//
// After every draw, each chart writes one hidden <i data-series data-round data-value>
// per point it drew, read back from Chart.js's own parsed data and element positions,
// so the tests check what was plotted rather than a copy of the input. Any number in
// the status may be null (a round that could not be evaluated, a non-finite figure):
// such a point is simply not drawn. <body data-rendered="ok"> marks a successful
// render; data-error holds the message of any script error.
"use strict";

// Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
const COLORS = {
  accuracy: "#0072b2", loss: "#d55e00",
  selected: "#a3acb9", reported: "#009e73", late: "#e69f00", dropped: "#d55e00",
  mb_down: "#0072b2", mb_up: "#cc79a7", mb_up_float32: "#ead1e1",
  on_device_global: "#0072b2", personalized: "#009e73", epsilon: "#cc79a7",
  clip_norm: "#0072b2", zeroing_norm: "#d55e00", zeroed: "#e69f00",
};
const LABELS = {
  accuracy: "accuracy", loss: "loss", selected: "selected", reported: "reported", late: "late",
  dropped: "dropped", mb_down: "down", mb_up: "up", mb_up_float32: "up as float32",
  on_device_global: "global model", personalized: "personalised", epsilon: "ε",
  clip_norm: "clip norm", zeroing_norm: "zeroing norm", zeroed: "updates zeroed",
};
const DECIMALS = {
  accuracy: 4, loss: 4, on_device_global: 4, personalized: 4, epsilon: 4,
  selected: 0, reported: 0, late: 0, dropped: 0, mb_down: 3, mb_up: 3, mb_up_float32: 3,
  clip_norm: 4, zeroing_norm: 4, zeroed: 0,
};
const percent = (v) => `${(100 * v).toFixed(1)}%`;
const SHOW = {  // how a value reads in tooltips and captions
  accuracy: percent, on_device_global: percent, personalized: percent,
  loss: (v) => v.toFixed(4), epsilon: (v) => v.toFixed(2), mb_down: (v) => `${v.toFixed(2)} MB`,
  mb_up: (v) => `${v.toFixed(2)} MB`, mb_up_float32: (v) => `${v.toFixed(2)} MB`,
};
const show = (series, v) => (SHOW[series] || String)(v);

window.addEventListener("error", (e) => { document.body.dataset.error = String(e.message); });
window.addEventListener("unhandledrejection", (e) => { document.body.dataset.error = String(e.reason); });

Chart.defaults.animation = false;  // redrawn every 2 s: movement would only distract
Chart.defaults.maintainAspectRatio = false;
Chart.defaults.font.family = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
Chart.defaults.font.size = 12;
Chart.defaults.color = "#4b5563";
Chart.defaults.borderColor = "#e5e7eb";

/** A finite number, or null for anything else (null, missing, a string). */
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

let abandoned = [];  // the status's abandoned rounds, as of the last render

// Rounds with an abandoned attempt get a shaded column on every chart.
const abandonedBands = {
  id: "abandonedRounds",
  beforeDatasetsDraw(chart, _args, options) {
    const labels = chart.data.labels, area = chart.chartArea, x = chart.scales.x;
    if (!labels.length || !options.rounds.length) return;
    const slot = area.width / labels.length;  // x is offset: each round owns one slot
    const ctx = chart.ctx;
    ctx.save();
    ctx.fillStyle = "rgba(213, 94, 0, 0.12)";
    for (const round of new Set(options.rounds)) {
      const i = labels.indexOf(round);
      if (i >= 0) ctx.fillRect(x.getPixelForValue(i) - slot / 2, area.top, slot, area.height);
    }
    ctx.restore();
  },
};

// The record of what was drawn, rewritten after each draw of the chart.
const drawnPoints = {
  id: "drawnPoints",
  afterDraw(chart) {
    const marks = [];
    for (const meta of chart.getSortedVisibleDatasetMetas()) {
      const series = chart.data.datasets[meta.index].series;
      meta.data.forEach((element, j) => {
        const parsed = meta._parsed[j];
        if (!parsed || element.skip || num(parsed.y) === null || !chart.isPointInArea(element)) return;
        const mark = document.createElement("i");
        mark.dataset.series = series;
        mark.dataset.round = chart.scales.x.getLabelForValue(parsed.x);
        mark.dataset.value = parsed.y.toFixed(DECIMALS[series]);
        marks.push(mark);
      });
    }
    const figure = chart.canvas.closest("figure");
    let record = figure.querySelector(".drawn");
    if (!record) record = figure.appendChild(Object.assign(document.createElement("div"), { className: "drawn", hidden: true }));
    record.replaceChildren(...marks);
  },
};

function makeChart(id, type, series, yTitle, y = {}) {
  const single = series.length === 1;
  const datasets = series.map((s) => ({
    series: s, label: LABELS[s], data: [],
    borderColor: COLORS[s], pointBackgroundColor: COLORS[s],
    backgroundColor: type === "bar" ? COLORS[s] : `${COLORS[s]}1f`,
    ...(type === "bar"
      ? { pointStyle: "rectRounded", borderRadius: 2, maxBarThickness: 28, categoryPercentage: 0.8, barPercentage: 0.9 }
      : { borderWidth: 2, pointRadius: 3, pointHoverRadius: 5, fill: single ? "origin" : false, spanGaps: false }),
  }));
  return new Chart(document.getElementById(id), {
    type,
    data: { labels: [], datasets },
    options: {
      interaction: { mode: "index", intersect: false },
      plugins: {
        abandonedRounds: { rounds: [] },
        legend: {
          display: !single, align: "start",
          labels: {
            usePointStyle: true, boxWidth: type === "bar" ? 8 : 5, boxHeight: type === "bar" ? 8 : 5, padding: 14,
            generateLabels: legendWithLatest,
            filter: (item, data) => data.datasets[item.datasetIndex].data.some((v) => v !== null),
          },
        },
        tooltip: {
          filter: (item) => num(item.parsed.y) !== null,
          callbacks: {
            // Items can be empty: at a round where every value is null the filter leaves none.
            title: (items) => (items.length ? `round ${items[0].label}` : ""),
            label: (item) => `${item.dataset.label}: ${show(item.dataset.series, item.parsed.y)}`,
            footer: (items) => {
              const round = items.length ? Number(items[0].label) : null;
              return abandoned.filter((a) => a.round === round).map((a) => `an attempt was abandoned: ${a.reason ?? "no reason given"}`);
            },
          },
        },
      },
      scales: {
        x: { type: "category", offset: true, title: { display: true, text: "round" }, ticks: { maxRotation: 0, autoSkipPadding: 8 } },
        y: { beginAtZero: true, title: { display: true, text: yTitle }, ...y, ticks: { maxTicksLimit: 7, ...y.ticks } },
      },
    },
    plugins: [abandonedBands, drawnPoints],
  });
}

const accuracyAxis = { max: 1, ticks: { callback: (v) => `${Math.round(100 * v)}%` } };
const charts = {
  accuracy: makeChart("accuracy", "line", ["accuracy"], "accuracy", accuracyAxis),
  loss: makeChart("loss", "line", ["loss"], "loss"),
  participation: makeChart("participation", "bar", ["selected", "reported", "late", "dropped"], "devices", { ticks: { precision: 0 } }),
  bytes: makeChart("bytes", "bar", ["mb_down", "mb_up", "mb_up_float32"], "MB", { grace: "8%" }),
  personalization: makeChart("personalization", "line", ["on_device_global", "personalized"], "accuracy", accuracyAxis),
  privacy: makeChart("privacy", "line", ["epsilon"], "ε"),
  aggregator: makeChart("aggregator", "line", ["clip_norm", "zeroing_norm", "zeroed"], "L2 norm / updates"),
};

// TFF's measurements of the robust and DP aggregators, by their paths in TFF's structure.
const CLIP_NORM = ["zeroing/clipping_norm", "clipping_norm", "zeroing/dp_query_metrics/clip", "dp_query_metrics/clip"];
const measured = (h, paths) => num(paths.map((p) => h.measurements?.[p]).find((v) => v !== undefined));

/** One number per history entry (null where there is none) for each series. */
function seriesValues(history) {
  const mb = (v) => (num(v) === null ? null : v / 1e6);
  return {
    accuracy: history.map((h) => num(h.accuracy)),
    loss: history.map((h) => num(h.loss)),
    selected: history.map((h) => num(h.selected)),
    reported: history.map((h) => num(h.reported)),
    late: history.map((h) => num(h.late)),
    dropped: history.map((h) => num(h.dropped)),
    mb_down: history.map((h) => mb(h.bytes_down)),
    mb_up: history.map((h) => mb(h.bytes_up)),
    mb_up_float32: history.map((h) => (h.upload_bits ? mb(h.bytes_up_float32) : null)),
    on_device_global: history.map((h) => num(h.personalization?.global_accuracy)),
    personalized: history.map((h) => num(h.personalization?.personalized_accuracy)),
    epsilon: history.map((h) => num(h.privacy?.epsilon)),
    clip_norm: history.map((h) => measured(h, CLIP_NORM)),
    zeroing_norm: history.map((h) => measured(h, ["zeroing_norm"])),
    zeroed: history.map((h) => measured(h, ["zeroed_count"])),
  };
}

/** The round axis: every evaluated round and every round with an abandoned attempt. */
function roundAxis(history) {
  const rounds = new Set([...history.map((h) => h.round), ...abandoned.map((a) => a.round)].filter((r) => num(r) !== null));
  return [...rounds].sort((a, b) => a - b);
}

/** A chart that only some runs have (DP's privacy, robust's norms) shows once it has a point. */
function showWhenDrawn(name, values) {
  const figure = document.getElementById(`${name}-figure`);
  const show = values.some((v) => v !== null);
  if (figure.hidden === show) {
    figure.hidden = !show;
    if (show) charts[name].resize();
  }
}

function drawCharts(history) {
  const labels = roundAxis(history);
  const values = seriesValues(history);
  const position = new Map(history.map((h, i) => [h.round, i]));
  showWhenDrawn("privacy", values.epsilon);
  showWhenDrawn("aggregator", [...values.clip_norm, ...values.zeroing_norm]);
  for (const chart of Object.values(charts)) {
    chart.data.labels = labels;
    for (const dataset of chart.data.datasets) {
      dataset.data = labels.map((r) => (position.has(r) ? values[dataset.series][position.get(r)] : null));
    }
    chart.options.plugins.abandonedRounds.rounds = abandoned.map((a) => a.round);
    chart.update();
    caption(chart, labels);
  }
}

/** The newest value in a dataset and its index, or null. */
function latest(dataset) {
  const i = dataset.data.findLastIndex((v) => v !== null);
  return i < 0 ? null : { i, value: dataset.data[i] };
}

/** Legend entries that also name each series' newest value. */
function legendWithLatest(chart) {
  const items = Chart.defaults.plugins.legend.labels.generateLabels(chart);
  for (const item of items) {
    const dataset = chart.data.datasets[item.datasetIndex];
    const last = latest(dataset);
    if (last) item.text = `${dataset.label}  ${show(dataset.series, last.value)}`;
  }
  return items;
}

/** A single series' newest value, beside the chart's title (never over the curve). */
function caption(chart, labels) {
  const [dataset, ...more] = chart.data.datasets;
  const last = latest(dataset);
  const parts = [];
  if (!more.length && last) {
    const dot = Object.assign(document.createElement("b"), { className: "dot" });
    dot.style.background = dataset.borderColor;
    parts.push(dot, `round ${labels[last.i]}: ${show(dataset.series, last.value)}`);
  }
  chart.canvas.closest("figure").querySelector(".latest").replaceChildren(...parts);
}

function drawAbandoned() {
  document.getElementById("abandoned").hidden = !abandoned.length;
  document.getElementById("abandoned-rows").replaceChildren(...abandoned.map((a) => {
    const row = document.createElement("tr");
    row.dataset.abandonedRound = String(a.round);
    row.dataset.reason = String(a.reason ?? "");
    const at = num(a.at) === null ? "" : new Date(a.at * 1000).toLocaleTimeString();
    for (const text of [a.round ?? "", a.reason ?? "", a.detail ?? "", at]) {
      row.appendChild(document.createElement("td")).textContent = String(text);
    }
    return row;
  }));
}

function drawRun(status, history) {
  const run = status.run;
  const text = document.getElementById("run");
  const roundText = document.getElementById("round-text");
  const bar = document.getElementById("round-bar");
  if (!run) {
    text.textContent = "no run yet";
    roundText.textContent = "no round open";
    bar.style.width = "0";
    return;
  }
  const cfg = run.config || {};
  const done = history.length ? history[history.length - 1].round : 0;
  const model = status.model ? `model version ${status.model.version}` : "no model yet";
  text.textContent = `run ${run.status}: model ${cfg.model} on ${cfg.dataset}, ${done}/${cfg.rounds} rounds, ` +
    `${status.devices ?? 0} devices registered, ${model}`;
  const current = status.round;
  if (current) {
    const target = num(current.target_reports) ?? 0;
    const reported = num(current.reported) ?? 0;
    const left = num(current.seconds_left);
    roundText.textContent = `round ${current.number} ${current.status}: ${reported}/${target} reports, ` +
      `${current.selected ?? 0} selected` + (left === null ? "" : `, ${left.toFixed(0)} s to its deadline`);
    bar.style.width = `${Math.min(100, (100 * reported) / Math.max(target, 1))}%`;
  } else {
    const finished = run.status === "finished";
    roundText.textContent = finished ? "run finished" : "no round open";
    bar.style.width = finished ? "100%" : "0";
  }
}

function render(status) {
  const history = (Array.isArray(status.history) ? status.history : []).filter((h) => h && num(h.round) !== null);
  abandoned = (Array.isArray(status.abandoned) ? status.abandoned : []).filter((a) => a && num(a.round) !== null);
  drawRun(status, history);
  drawAbandoned();
  drawCharts(history);
  document.body.dataset.rounds = String(history.length);
}

async function refresh() {
  let status = null;
  try {
    const response = await fetch("v1/status", { cache: "no-store" });
    status = await response.json();
  } catch (error) {
    document.getElementById("run").textContent = `coordinator unreachable (${error})`;
  }
  if (status) {
    try {
      render(status);
      document.body.dataset.rendered = "ok";
    } catch (error) {
      document.body.dataset.rendered = "error";
      document.body.dataset.error = String(error && error.stack || error);
    }
  }
  setTimeout(refresh, 2000);
}

refresh();
