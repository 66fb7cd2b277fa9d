// A device's past, drawn from its history stream: the presence timeline (online and offline
// periods with their reasons; flapping shows as dense stripes) and a plot of each numeric leaf
// of the reported state.

import { TimeChart, formatNum } from "./chart.js";
import { formatAgo, h, isPlainObject, toEpochMs } from "./util.js";

export const DAY_MS = 86400e3;
const HOUR_MS = 3600e3;
const FLAPPING_CHANGES = 6; // presence changes within the last hour that make a device "flapping"
const MAX_PLOTS = 6;
const SVG = "http://www.w3.org/2000/svg";

/**
 * Online/offline periods over [t0, t1] from history items (newest first).
 * `complete`: the history reaches back to the device's registration (nothing older is kept).
 */
export function presencePeriods(items, { t0, t1, status, registeredAt, complete }) {
  const events = items
    .filter((e) => isPlainObject(e) && e.type === "presence")
    .map((e) => ({ t: toEpochMs(e.timestamp), v: Number(e.version) || 0, status: e.status === "online" ? "online" : "offline", reason: String(e.reason || "") }))
    .filter((e) => e.t !== null)
    // times are to the millisecond: changes within one are ordered by their presence version
    .sort((a, b) => a.t - b.t || a.v - b.v);
  // before the oldest event read: unknown, unless the history is whole (then: not yet registered)
  const oldest = events.length ? events[0].t : t1;
  const knownFrom = complete ? Math.max(t0, registeredAt || t0) : Math.max(t0, events.length ? oldest : t0);
  const periods = [];
  if (knownFrom > t0) periods.push({ start: t0, end: knownFrom, status: complete ? "absent" : "unknown", reason: "" });
  let current = { start: knownFrom, status: null, reason: "" };
  for (const e of events) {
    if (e.t <= knownFrom) {
      current = { start: knownFrom, status: e.status, reason: e.reason };
      continue;
    }
    if (e.t > t1) break;
    // the first event inside the window says what came before it: the other state
    const before = current.status ?? (e.status === "online" ? "offline" : "online");
    // a period that began and ended within one millisecond is still a period (drawn thin)
    if (e.t > current.start || current.status !== null) periods.push({ start: current.start, end: e.t, status: before, reason: current.reason });
    current = { start: e.t, status: e.status, reason: e.reason };
  }
  const last = current.status ?? (status === "online" ? "online" : "offline");
  if (t1 > current.start) periods.push({ start: current.start, end: t1, status: last, reason: current.reason });
  const changes = events.filter((e) => e.t > t0 && e.t <= t1);
  const lastHour = changes.filter((e) => e.t > t1 - HOUR_MS).length;
  return { periods, changes: changes.length, lastHour, flapping: lastHour >= FLAPPING_CHANGES };
}

/** The timeline as SVG (one rect per period, titled with its reason) and a one-line summary. */
export function renderTimeline(box, summary, result, t0, t1) {
  const span = Math.max(1, t1 - t0);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 1000 20");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "timeline-bar");
  svg.setAttribute("role", "img");
  let online = 0;
  let known = 0;
  for (const p of result.periods) {
    const x = ((p.start - t0) / span) * 1000;
    const w = Math.max(0.6, ((p.end - p.start) / span) * 1000);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", x.toFixed(2));
    rect.setAttribute("y", "0");
    rect.setAttribute("width", w.toFixed(2));
    rect.setAttribute("height", "20");
    rect.setAttribute("class", `period ${p.status}`);
    rect.dataset.status = p.status;
    const title = document.createElementNS(SVG, "title");
    const when = `${new Date(p.start).toLocaleString()} – ${new Date(p.end).toLocaleTimeString()}`;
    title.textContent = `${p.status}${p.reason ? ` (${p.reason})` : ""}: ${when}`;
    rect.append(title);
    svg.append(rect);
    if (p.status === "online") online += p.end - p.start;
    if (p.status === "online" || p.status === "offline") known += p.end - p.start;
  }
  const share = known ? Math.round((online / known) * 100) : 0;
  const during = span >= DAY_MS - 60e3 ? "in 24 h" : `in ${spanText(span)}`;
  const text = result.changes === 0
    ? `No presence change ${during}; online ${share}% of the time.`
    : `${result.changes} presence change${result.changes === 1 ? "" : "s"} ${during} (${result.lastHour} in the last hour); online ${share}% of the time.`;
  svg.setAttribute("aria-label", `Presence timeline: ${text}`);
  box.dataset.periods = String(result.periods.length);
  box.dataset.changes = String(result.changes);
  box.replaceChildren(svg, h("div", { class: "timeline-axis small muted", "aria-hidden": "true" },
    h("span", null, `${spanText(span)} ago`), h("span", null, clock(t0 + span / 2)), h("span", null, "now")));
  summary.textContent = text;
}

function spanText(ms) {
  if (ms >= 2 * HOUR_MS) return `${Math.round(ms / HOUR_MS)} h`;
  if (ms >= 120e3) return `${Math.round(ms / 60e3)} min`;
  return `${Math.round(ms / 1000)} s`;
}

function clock(ms) {
  const d = new Date(ms);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

/** Every numeric leaf of a document, as [dotted path, value]. Arrays are not walked. */
export function numericLeaves(doc, path = [], out = []) {
  if (!isPlainObject(doc)) return out;
  for (const [key, value] of Object.entries(doc)) {
    if (typeof value === "number" && Number.isFinite(value)) out.push([[...path, key].join("."), value]);
    else if (isPlainObject(value)) numericLeaves(value, [...path, key], out);
  }
  return out;
}

/** One series per numeric leaf of the reported state, from the history's state events. */
export function reportedSeries(items) {
  const series = new Map();
  for (let i = items.length - 1; i >= 0; i--) {
    const e = items[i];
    if (!isPlainObject(e) || e.type !== "state" || e.section !== "reported") continue;
    const t = toEpochMs(e.timestamp);
    if (t === null) continue;
    for (const [path, value] of numericLeaves(e.state)) {
      if (!series.has(path)) series.set(path, []);
      series.get(path).push([t, value]);
    }
  }
  return [...series.entries()]
    .sort((a, b) => b[1].length - a[1].length || (a[0] < b[0] ? -1 : 1))
    .slice(0, MAX_PLOTS);
}

/** Small plots, one per leaf; charts are kept per path so redrawing reuses the canvases. */
export class LeafPlots {
  constructor(box) {
    this.box = box;
    this.charts = new Map();
  }

  render(items, t0, t1) {
    const series = reportedSeries(items);
    this.box.dataset.leaves = series.map(([path]) => path).join(",");
    if (!series.length) {
      this.charts.clear();
      this.box.replaceChildren(h("p", { class: "muted small" }, "No numeric reported values in the history yet."));
      return;
    }
    const keep = new Set(series.map(([path]) => path));
    for (const path of [...this.charts.keys()]) if (!keep.has(path)) this.charts.delete(path);
    const nodes = [];
    for (const [path, points] of series) {
      let entry = this.charts.get(path);
      if (!entry) {
        const canvas = h("canvas", { class: "plot", role: "img", dataset: { path } });
        const latest = h("span", { class: "plot-latest" });
        const node = h("figure", { class: "plot-box", dataset: { path } },
          h("figcaption", null, h("code", null, path), latest), canvas);
        entry = { node, latest, chart: new TimeChart(canvas, { label: path }) };
        this.charts.set(path, entry);
      }
      const [t, value] = points[points.length - 1];
      entry.latest.textContent = `${formatNum(value)} · ${formatAgo(t)}`;
      // the window's values over their own time span (at least a minute); a device quiet for
      // longer than the window shows its older values
      const inWindow = points.filter((p) => p[0] >= t0);
      const shown = inWindow.length ? inWindow : points;
      const start = Math.min(shown[0][0], t1 - 60e3);
      entry.chart.setData({ t0: start, t1, zero: false, series: [{ name: path, points: shown }] });
      nodes.push(entry.node);
    }
    this.box.replaceChildren(...nodes);
    for (const [, entry] of this.charts) entry.chart.draw();
  }
}
