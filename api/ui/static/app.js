// The status page: renders the fleet model from /ui/stream (server-sent events), falling
// back to polling /ui/model. No framework, no external file, no inline script (the CSP).
"use strict";

const STATE_COLOURS = {
  healthy: "#1f8a4c", degraded: "#c47f00", draining: "#2f6fd6", down: "#c8302c",
  starting: "#7a56c2", unknown: "#8a94a3",
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "width") node.style.width = value; // CSSOM: allowed by the CSP
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(text) {
  return el("span", { class: `badge badge-${text}` }, text);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// Connections over the last minutes as a line, the node's state as a strip under it.
function sparkline(series, width = 160, height = 34) {
  const chart = svg("svg", {
    class: "spark", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
  });
  // The last 5 minutes at most; a shorter history fills the width (at least a minute).
  const span = Math.max(60, ...series.map((s) => -s[0]));
  const x = (age) => width + (age / span) * width;
  const strip = 6;
  const top = height - strip - 2;
  const peak = Math.max(1, ...series.map((s) => s[1]));
  for (let i = 0; i < series.length; i++) {
    const [age, , state, liveness] = series[i];
    const next = i + 1 < series.length ? series[i + 1][0] : 0;
    const colour = liveness === "dead" ? STATE_COLOURS.down : STATE_COLOURS[state] || STATE_COLOURS.unknown;
    chart.append(svg("rect", {
      x: x(age).toFixed(1), y: height - strip, height: strip,
      width: Math.max(1, x(next) - x(age)).toFixed(1), fill: colour,
    }));
  }
  if (series.length > 1) {
    const points = series.map(([age, conns]) =>
      `${x(age).toFixed(1)},${(top - (conns / peak) * (top - 2)).toFixed(1)}`);
    chart.append(svg("polyline", {
      points: points.join(" "), fill: "none", stroke: "#2f6fd6", "stroke-width": "1.5",
    }));
  }
  const title = svg("title", {});
  const last = series.length ? series[series.length - 1][1] : 0;
  title.textContent = `connections now ${last}, peak ${peak} over the last 5 minutes`;
  chart.append(title);
  return chart;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  return seconds < 60 ? `${seconds.toFixed(1)} s ago` : `${Math.round(seconds / 60)} min ago`;
}

function renderSites(model) {
  const box = document.getElementById("sites");
  box.replaceChildren(...model.sites.map((site) => el("div", { class: "site", "data-site": site.name },
    el("h3", {}, site.name, " ", site.drain ? badge("drained") : null),
    el("div", { class: "bar" }, el("span", { width: `${site.share_pct}%` })),
    el("p", { class: "muted" },
      `${site.share_pct}% of traffic (${site.share_mbps} Mbit/s); operator weight ${site.operator_weight}`),
    el("p", { class: "muted" }, `${site.serving} of ${site.nodes} nodes serving`),
    site.drain ? el("p", { class: "muted" }, `drained by ${site.drain.author}: ${site.drain.reason}`) : null,
  )));
}

function cell(label, ...children) {
  return el("td", { "data-label": label }, ...children);
}

function renderNodes(model) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(...model.nodes.map((node) => el("tr", { "data-node": node.name, "data-state": node.state },
    cell("node", el("strong", {}, node.name), el("br"), el("span", { class: "muted" }, node.site)),
    cell("state", badge(node.state), " ", badge(node.liveness), el("br"),
      el("span", { class: "muted" }, `seen ${ago(node.last_seen_age_s)}`),
      node.health_detail ? el("div", { class: "muted" }, node.health_detail) : null),
    cell("admin", badge(node.admin_state),
      node.drain ? el("div", { class: "muted" }, `${node.drain.author}: ${node.drain.reason}`) : null,
      node.drain_phase ? el("div", { class: "muted", "data-drain-phase": node.drain_phase }, `drain: ${node.drain_phase}`) : null),
    cell("share", `${node.share_mbps} Mbit/s`, el("br"),
      el("span", { class: "muted" }, `operator weight ${node.operator_weight}`)),
    cell("BGP", `${node.bgp.established}/${node.bgp.peers} peers up`,
      node.bgp.reason ? el("div", { class: "muted" }, node.bgp.reason) : null),
    cell("backends", `${node.backends.healthy}/${node.backends.total} healthy`),
    cell("revision", node.applied_revision === null ? "–" : String(node.applied_revision),
      node.revision_lag ? el("span", { class: "muted" }, ` (${node.revision_lag} behind)`) : null),
    cell("last 5 min", sparkline(node.series)),
  )));
}

function renderList(id, items, render, empty) {
  const list = document.getElementById(id);
  list.replaceChildren(...(items.length ? items.map(render) : [el("li", { class: "muted" }, empty)]));
}

function render(model) {
  document.getElementById("summary").textContent =
    `${model.summary}${model.converged ? ", converged" : `, waiting for ${model.lagging.join(", ")}`}`;
  document.title = `anycast-edge: ${model.summary}`;
  renderSites(model);
  renderNodes(model);
  renderList("drains", model.drains, (d) => el("li", { "data-drain": `${d.kind}:${d.name}` },
    el("time", {}, new Date(d.since).toLocaleString()),
    `${d.kind} ${d.name} by ${d.author}: ${d.reason}`), "no drain in force");
  renderList("events", model.events, (e) => el("li", {},
    el("time", {}, new Date(e.time).toLocaleTimeString()),
    el("strong", {}, `${e.kind} ${e.subject}`), `: ${e.cause}`,
    e.author ? el("span", { class: "muted" }, ` (${e.author})`) : null), "no events yet");
  document.getElementById("problems").classList.add("hidden");
}

function problem(text) {
  const box = document.getElementById("problems");
  box.textContent = text;
  box.classList.remove("hidden");
}

function live(on) {
  const mark = document.getElementById("live");
  mark.textContent = on ? "live" : "offline";
  mark.className = `badge badge-${on ? "live" : "unknown"}`;
}

async function poll() {
  try {
    const answer = await fetch("/ui/model", { credentials: "same-origin" });
    if (answer.status === 401) { window.location.assign("/ui/login"); return; }
    if (answer.ok) render(await answer.json());
    else problem(`the API answered ${answer.status}`);
  } catch (error) {
    problem(`the API is unreachable: ${error}`);
  }
}

function connect() {
  if (!("EventSource" in window)) { poll(); setInterval(poll, 2000); return; }
  const source = new EventSource("/ui/stream");
  source.addEventListener("model", (event) => { live(true); render(JSON.parse(event.data)); });
  source.addEventListener("problem", (event) => problem(JSON.parse(event.data).detail));
  source.addEventListener("error", () => { live(false); });
}

document.addEventListener("DOMContentLoaded", connect);
