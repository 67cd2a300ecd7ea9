// Polls /v1/status and draws it. Every plotted mark carries data-series, data-round
// and data-value, so what is drawn can be checked against the API (the tests do).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const W = 480, H = 240, LEFT = 48, RIGHT = 12, TOP = 12, BOTTOM = 30;
const COLORS = {
  accuracy: "#2b7bb9", loss: "#c0392b", selected: "#9aa5b1", reported: "#27ae60",
  late: "#f39c12", dropped: "#c0392b", mb_down: "#2b7bb9", mb_up: "#8e44ad", mb_up_float32: "#d7bde2",
  on_device_global: "#2b7bb9", personalized: "#27ae60", epsilon: "#8e44ad",
};

function el(name, attrs, parent, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}

function frame(svg, rounds, ymax, yfmt) {
  svg.replaceChildren();
  const x = (i) => LEFT + (rounds.length <= 1 ? (W - LEFT - RIGHT) / 2 : i * (W - LEFT - RIGHT) / (rounds.length - 1));
  const y = (v) => H - BOTTOM - (ymax > 0 ? v / ymax : 0) * (H - TOP - BOTTOM);
  el("line", { x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM, class: "axis" }, svg);
  el("line", { x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM, class: "axis" }, svg);
  for (const f of [0, 0.5, 1]) {
    el("text", { x: LEFT - 4, y: y(f * ymax) + 4, "text-anchor": "end" }, svg, yfmt(f * ymax));
  }
  const step = Math.max(1, Math.ceil(rounds.length / 10));
  rounds.forEach((r, i) => {
    if (i % step === 0 || i === rounds.length - 1) {
      el("text", { x: x(i), y: H - BOTTOM + 16, "text-anchor": "middle" }, svg, String(r));
    }
  });
  el("text", { x: (LEFT + W - RIGHT) / 2, y: H - 2, "text-anchor": "middle" }, svg, "round");
  return { x, y };
}

function lineChart(svg, rounds, groups, ymax, fmt) {
  // groups: [{series, values}]; a null value (no data that round) is not drawn.
  const { x, y } = frame(svg, rounds, ymax, fmt);
  if (!rounds.length) return;
  groups.forEach((g, j) => {
    const drawn = g.values.map((v, i) => [v, i]).filter(([v]) => v !== null && v !== undefined);
    if (!drawn.length) return;
    el("polyline", { points: drawn.map(([v, i]) => `${x(i)},${y(v)}`).join(" "), class: "line", stroke: COLORS[g.series] }, svg);
    for (const [v, i] of drawn) {
      const dot = el("circle", {
        cx: x(i), cy: y(v), r: 3.5, fill: COLORS[g.series],
        "data-series": g.series, "data-round": rounds[i], "data-value": v.toFixed(4),
      }, svg);
      el("title", {}, dot, `round ${rounds[i]} ${g.series.replaceAll("_", " ")}: ${v.toFixed(4)}`);
    }
    const [last] = drawn[drawn.length - 1];
    const label = groups.length > 1 ? `${g.series.replaceAll("_", " ")} ${fmt(last)}` : `round ${rounds[rounds.length - 1]}: ${fmt(last)}`;
    el("text", { x: W - RIGHT, y: TOP + 10 + 14 * j, "text-anchor": "end", fill: COLORS[g.series] }, svg, label);
  });
}

function barChart(svg, rounds, groups, ymax, fmt) {
  // groups: [{series, values}], drawn side by side within each round's slot.
  svg.replaceChildren();
  const top = TOP + 18;  // room for the legend above the bars
  const slot = (W - LEFT - RIGHT) / Math.max(rounds.length, 1);
  const width = Math.max(1, (slot * 0.8) / groups.length);
  const y = (v) => H - BOTTOM - (ymax > 0 ? v / ymax : 0) * (H - top - BOTTOM);
  el("line", { x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM, class: "axis" }, svg);
  el("line", { x1: LEFT, y1: top, x2: LEFT, y2: H - BOTTOM, class: "axis" }, svg);
  for (const f of [0, 0.5, 1]) el("text", { x: LEFT - 4, y: y(f * ymax) + 4, "text-anchor": "end" }, svg, fmt(f * ymax));
  const step = Math.max(1, Math.ceil(rounds.length / 10));
  rounds.forEach((r, i) => {
    const x0 = LEFT + i * slot + slot * 0.1;
    groups.forEach((g, j) => {
      const v = g.values[i];
      const bar = el("rect", {
        x: x0 + j * width, y: y(v), width: Math.max(width - 1, 1), height: H - BOTTOM - y(v), fill: COLORS[g.series],
        "data-series": g.series, "data-round": r, "data-value": String(v),
      }, svg);
      el("title", {}, bar, `round ${r} ${g.series}: ${v}`);
    });
    if (i % step === 0 || i === rounds.length - 1) {
      el("text", { x: LEFT + (i + 0.5) * slot, y: H - BOTTOM + 16, "text-anchor": "middle" }, svg, String(r));
    }
  });
  const legend = el("g", { class: "legend" }, svg);
  groups.forEach((g, j) => {
    el("rect", { x: LEFT + 8 + j * 90, y: TOP - 6, width: 10, height: 10, fill: COLORS[g.series] }, legend);
    el("text", { x: LEFT + 22 + j * 90, y: TOP + 3 }, legend, g.series.replaceAll("_", " "));
  });
}

function render(status) {
  if (!status.run) {
    document.getElementById("run").textContent = "no run yet";
    return;
  }
  const cfg = status.run.config;
  const history = status.history;
  const done = history.length ? history[history.length - 1].round : 0;
  document.getElementById("run").textContent =
    `run ${status.run.status}: model ${cfg.model} on ${cfg.dataset}, ${done}/${cfg.rounds} rounds, ` +
    `${status.devices} devices registered, model version ${status.model.version}`;

  const current = status.round;
  const bar = document.getElementById("round-bar");
  if (current) {
    const target = current.target_reports;
    document.getElementById("round-text").textContent =
      `round ${current.number} ${current.status}: ${current.reported}/${target} reports, ` +
      `${current.selected} selected, ${current.seconds_left.toFixed(0)} s to its deadline`;
    bar.style.width = `${Math.min(100, (100 * current.reported) / Math.max(target, 1))}%`;
  } else {
    document.getElementById("round-text").textContent = status.run.status === "finished" ? "run finished" : "no round open";
    bar.style.width = status.run.status === "finished" ? "100%" : "0";
  }

  const rounds = history.map((h) => h.round);
  const accuracy = history.map((h) => h.accuracy);
  const loss = history.map((h) => h.loss);
  lineChart(document.getElementById("accuracy"), rounds, [{ series: "accuracy", values: accuracy }], 1, (v) => v.toFixed(2));
  lineChart(document.getElementById("loss"), rounds, [{ series: "loss", values: loss }], Math.max(...loss, 0.1) * 1.1, (v) => v.toFixed(2));
  const personal = (key) => history.map((h) => (h.personalization ? h.personalization[key] : null));
  lineChart(document.getElementById("personalization"), rounds, [
    { series: "on_device_global", values: personal("global_accuracy") },
    { series: "personalized", values: personal("personalized_accuracy") },
  ], 1, (v) => v.toFixed(2));
  const epsilon = history.map((h) => (h.privacy ? h.privacy.epsilon : null));
  document.getElementById("privacy-figure").hidden = !epsilon.some((v) => v !== null);
  lineChart(document.getElementById("privacy"), rounds, [{ series: "epsilon", values: epsilon }],
    Math.max(1, ...epsilon.filter((v) => v !== null)) * 1.1, (v) => v.toFixed(2));
  const participation = ["selected", "reported", "late", "dropped"].map((series) => ({
    series, values: history.map((h) => h[series] || 0),
  }));
  barChart(document.getElementById("participation"), rounds, participation,
    Math.max(1, ...history.map((h) => h.selected)), (v) => v.toFixed(0));
  const mb = [
    { series: "mb_down", values: history.map((h) => +(h.bytes_down / 1e6).toFixed(1)) },
    { series: "mb_up", values: history.map((h) => +(h.bytes_up / 1e6).toFixed(1)) },
  ];
  if (history.some((h) => h.upload_bits)) {
    mb.push({ series: "mb_up_float32", values: history.map((h) => +((h.bytes_up_float32 || 0) / 1e6).toFixed(1)) });
  }
  barChart(document.getElementById("bytes"), rounds, mb,
    Math.max(0.1, ...mb.flatMap((g) => g.values)), (v) => v.toFixed(1));
  document.body.dataset.rounds = String(history.length);
  return status.run.status;
}

async function refresh() {
  let state = "running";
  try {
    const response = await fetch("v1/status", { cache: "no-store" });
    state = render(await response.json());
  } catch (error) {
    document.getElementById("run").textContent = `coordinator unreachable (${error})`;
  }
  if (state !== "finished") setTimeout(refresh, 2000);
}

refresh();
