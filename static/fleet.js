// The fleet card: online devices over the last hour, day or week (total and per type) from the
// server's series, with the live count as its newest point; and online/offline bars per type.

import { api } from "./api.js";
import { TimeChart, formatNum } from "./chart.js";
import { h, isPlainObject } from "./util.js";

const TYPE_LINES = 5; // per-type lines drawn beside the total: the largest types
const TYPE_BARS = 8;
const REFRESH_MS = 15000;
const SERIES_COLORS = ["--series-1", "--series-2", "--series-3", "--series-4", "--series-5"];

export class FleetCard {
  constructor({ canvas, readout, legend, bars, now, buttons }) {
    this.chart = new TimeChart(canvas, { readout, label: "Online devices" });
    this.canvas = canvas;
    this.legend = legend;
    this.bars = bars;
    this.now = now;
    this.buttons = buttons;
    this.range = "hour";
    this.doc = null; // the server's series for `range`
    this.live = null; // {t, online, byType}: what this page counts now
    this.loadedAt = 0;
    this.loading = null;
    this.barsSignature = "";
    for (const button of buttons) button.addEventListener("click", () => this.setRange(button.dataset.range));
  }

  setRange(range) {
    if (!["hour", "day", "week"].includes(range)) return;
    this.range = range;
    for (const button of this.buttons) button.setAttribute("aria-pressed", String(button.dataset.range === range));
    this.doc = null;
    this.render();
    this.load();
  }

  /** Fetch the series of the current range (coalesced; a stale answer is dropped). */
  load() {
    const range = this.range;
    if (this.loading && this.loading.range === range) return this.loading.promise;
    const promise = api("GET", `/api/stats/history?range=${range}`).then((res) => {
      if (this.loading?.promise === promise) this.loading = null;
      if (range !== this.range || !res.ok || !isPlainObject(res.data)) return;
      this.doc = res.data;
      this.loadedAt = Date.now();
      this.canvas.dataset.range = range;
      this.canvas.dataset.server = String(Array.isArray(res.data.points) ? res.data.points.length : 0);
      this.render();
    });
    this.loading = { range, promise };
    return promise;
  }

  /** Once a second: the live counts become the newest point; the series is refetched now and then. */
  tick(online, byType) {
    this.live = { t: Date.now(), online, byType: isPlainObject(byType) ? byType : {} };
    this.now.textContent = `(${online.toLocaleString()} now)`;
    if (Date.now() - this.loadedAt > REFRESH_MS) this.load();
    this.render();
    this.renderBars(this.live.byType);
  }

  render() {
    const doc = this.doc;
    const now = Date.now();
    const span = (Number(doc?.span) || 3600) * 1000;
    const step = (Number(doc?.step) || 10) * 1000;
    const points = Array.isArray(doc?.points) ? doc.points.filter(isPlainObject) : [];
    const total = points.map((p) => [p.t * 1000, Number(p.online) || 0]);
    const band = this.range === "hour" ? [] : points.map((p) => [p.t * 1000, Number(p.online_min) || 0, Number(p.online_max) || 0]);
    const live = this.live;
    if (live) total.push([live.t, live.online]);
    const root = getComputedStyle(document.documentElement);
    const color = (name) => root.getPropertyValue(name).trim();
    const series = [{ name: "online", color: color("--chart-line"), width: 2, points: total, band }];
    for (const [index, type] of this.largestTypes(points).entries()) {
      const line = [];
      for (const p of points) {
        const counts = p.by_type?.[type];
        if (counts) line.push([p.t * 1000, Number(counts.online) || 0]);
      }
      const current = live?.byType?.[type];
      if (current) line.push([live.t, Number(current.online) || 0]);
      series.push({ name: type, color: color(SERIES_COLORS[index]), width: 1.25, points: line });
    }
    // the range, or less while the series is younger than it (a new gateway): from its first
    // point, a minute at least; a point a sample missed stays a gap
    const first = points.length ? points[0].t * 1000 : now;
    const t0 = Math.max(now - span, Math.min(first, now - 60e3));
    this.chart.setData({ t0, t1: now, gap: step * 2.5, series });
    this.renderLegend(series);
  }

  largestTypes(points) {
    const latest = points.length ? points[points.length - 1].by_type : this.live?.byType;
    if (!isPlainObject(latest)) return [];
    return Object.entries(latest)
      .sort((a, b) => (Number(b[1]?.registered) || 0) - (Number(a[1]?.registered) || 0) || (a[0] < b[0] ? -1 : 1))
      .slice(0, TYPE_LINES)
      .map(([type]) => type);
  }

  renderLegend(series) {
    const signature = series.map((s) => `${s.name}:${s.color}`).join("|");
    if (this.legend.dataset.signature === signature) return;
    this.legend.dataset.signature = signature;
    this.legend.replaceChildren(...series.map((s) => h("li", null,
      h("span", { class: "swatch", style: `background:${s.color}`, "aria-hidden": "true" }), s.name)));
  }

  renderBars(byType) {
    const entries = Object.entries(byType)
      .filter(([, c]) => isPlainObject(c))
      .sort((a, b) => (Number(b[1].registered) || 0) - (Number(a[1].registered) || 0) || (a[0] < b[0] ? -1 : 1));
    const signature = JSON.stringify(entries.slice(0, TYPE_BARS)) + entries.length;
    if (signature === this.barsSignature) return;
    this.barsSignature = signature;
    const rows = entries.slice(0, TYPE_BARS).map(([type, c]) => {
      const registered = Number(c.registered) || 0;
      const online = Math.min(registered, Number(c.online) || 0);
      const share = registered ? (online / registered) * 100 : 0;
      return h("li", { class: "type-bar", dataset: { type } },
        h("span", { class: "type-name", title: type }, type),
        h("span", { class: "bar", role: "img", "aria-label": `${type}: ${online} of ${registered} online` },
          h("span", { class: "bar-online", style: `width:${share.toFixed(1)}%` })),
        h("span", { class: "type-count" }, `${formatNum(online)} / ${formatNum(registered)}`));
    });
    if (entries.length > TYPE_BARS) rows.push(h("li", { class: "muted small" }, `and ${entries.length - TYPE_BARS} more types`));
    if (!rows.length) rows.push(h("li", { class: "muted small" }, "No devices yet."));
    this.bars.replaceChildren(...rows);
  }
}
