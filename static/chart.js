// A small canvas time chart: a few line series over a time window, an optional min–max band,
// a gap where points are missing, a time axis and a hover readout. No dependency: plotting a
// week of points (1,008 per series) takes well under a millisecond.

const PAD = { l: 40, r: 8, t: 8, b: 18 };
const FONT = "11px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";

export class TimeChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{readout?: HTMLElement, label?: string, format?: (v:number) => string}} opts
   */
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.readout = opts.readout || null;
    this.label = opts.label || "";
    this.format = opts.format || formatNum;
    this.data = { t0: 0, t1: 1, series: [], gap: Infinity };
    this.hoverX = null;
    if (typeof ResizeObserver === "function") new ResizeObserver(() => this.draw()).observe(canvas);
    canvas.addEventListener("mousemove", (e) => {
      this.hoverX = e.offsetX;
      this.draw();
    });
    canvas.addEventListener("mouseleave", () => {
      this.hoverX = null;
      this.draw();
    });
  }

  /**
   * @param {{t0:number, t1:number, gap?:number, series: Array<{name:string, color?:string,
   *   width?:number, points: Array<[number, number]>, band?: Array<[number, number, number]>}>}} data
   *   times in epoch ms; two points further apart than `gap` are not joined.
   */
  setData(data) {
    this.data = { gap: Infinity, ...data };
    const first = data.series[0];
    this.canvas.dataset.points = String(first ? first.points.length : 0);
    this.canvas.dataset.series = data.series.map((s) => s.name).join(",");
    if (first && first.points.length) {
      const values = first.points.map((p) => p[1]);
      const last = values[values.length - 1];
      this.canvas.dataset.latest = String(last);
      this.canvas.setAttribute("aria-label",
        `${this.label || first.name}: now ${this.format(last)}, lowest ${this.format(Math.min(...values))}, ` +
        `highest ${this.format(Math.max(...values))}, ${first.points.length} points`);
    } else {
      delete this.canvas.dataset.latest;
      this.canvas.setAttribute("aria-label", `${this.label || "chart"}: no data yet`);
    }
    this.draw();
  }

  draw() {
    if (document.hidden) return;
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cssW = c.clientWidth || 300;
    const cssH = c.clientHeight || 120;
    const W = Math.round(cssW * dpr);
    const H = Math.round(cssH * dpr);
    if (c.width !== W) c.width = W;
    if (c.height !== H) c.height = H;
    const ctx = c.getContext("2d");
    if (!ctx) return;
    const started = performance.now();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const styles = getComputedStyle(c);
    const css = (name, fallback) => styles.getPropertyValue(name).trim() || fallback;
    const grid = css("--chart-grid", "#e6e9ed");
    const text = css("--chart-text", "#57606a");

    const { t0, t1, series, gap } = this.data;
    const w = Math.max(10, cssW - PAD.l - PAD.r);
    const hh = Math.max(10, cssH - PAD.t - PAD.b);
    const [lo, hi] = this.range(series);
    const x = (t) => PAD.l + ((t - t0) / Math.max(1, t1 - t0)) * w;
    const y = (v) => PAD.t + hh - ((v - lo) / (hi - lo)) * hh;

    ctx.font = FONT;
    ctx.fillStyle = text;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.l, yy);
      ctx.lineTo(PAD.l + w, yy);
      ctx.stroke();
      ctx.fillText(this.format(v), PAD.l - 4, yy);
    }
    ctx.textBaseline = "top";
    for (const [t, label, align] of timeTicks(t0, t1, w)) {
      ctx.textAlign = align;
      ctx.fillText(label, x(t), PAD.t + hh + 4);
    }

    for (const s of series) {
      const color = s.color || css("--chart-line", "#177534");
      if (s.band && s.band.length) {
        ctx.fillStyle = css("--chart-fill", "rgba(26,127,55,0.14)");
        for (const run of runs(s.band, gap)) {
          ctx.beginPath();
          run.forEach((b, i) => (i ? ctx.lineTo(x(b[0]), y(b[2])) : ctx.moveTo(x(b[0]), y(b[2]))));
          for (let i = run.length - 1; i >= 0; i--) ctx.lineTo(x(run[i][0]), y(run[i][1]));
          ctx.closePath();
          ctx.fill();
        }
      }
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = s.width || 1.5;
      for (const run of runs(s.points, gap)) {
        if (run.length === 1) {
          ctx.fillRect(x(run[0][0]) - 1.5, y(run[0][1]) - 1.5, 3, 3);
          continue;
        }
        ctx.beginPath();
        run.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
        ctx.stroke();
      }
    }
    this.drawHover(ctx, x, w, hh);
    c.dataset.drawMs = (performance.now() - started).toFixed(2);
  }

  /** The value axis: from 0 for counts (`zero`, the default), else around the values. */
  range(series) {
    let min = Infinity;
    let max = -Infinity;
    for (const s of series) {
      for (const p of s.points) {
        if (p[1] < min) min = p[1];
        if (p[1] > max) max = p[1];
      }
      for (const b of s.band || []) {
        if (b[1] < min) min = b[1];
        if (b[2] > max) max = b[2];
      }
    }
    if (this.data.zero !== false) return [0, niceCeil(Math.max(1, max))];
    if (!Number.isFinite(min)) return [0, 1];
    if (min === max) return [min - 1, max + 1];
    const pad = (max - min) * 0.08;
    return [min - pad, max + pad];
  }

  drawHover(ctx, x, w, hh) {
    if (!this.readout) return;
    const first = this.data.series[0];
    if (this.hoverX === null || !first || !first.points.length) {
      this.readout.textContent = "";
      return;
    }
    const { t0, t1 } = this.data;
    const t = t0 + ((this.hoverX - PAD.l) / w) * (t1 - t0);
    const parts = [];
    let at = null;
    for (const s of this.data.series) {
      const p = nearest(s.points, t);
      if (!p) continue;
      if (at === null) at = p[0];
      parts.push(`${s.name} ${this.format(p[1])}`);
    }
    if (at === null) return;
    const xx = Math.round(x(at)) + 0.5;
    ctx.strokeStyle = getComputedStyle(this.canvas).getPropertyValue("--chart-text").trim() || "#57606a";
    ctx.beginPath();
    ctx.moveTo(xx, PAD.t);
    ctx.lineTo(xx, PAD.t + hh);
    ctx.stroke();
    this.readout.textContent = `${new Date(at).toLocaleString()} · ${parts.join(" · ")}`;
  }
}

/** Consecutive points no further apart than `gap`. */
function runs(points, gap) {
  const out = [];
  let run = [];
  for (const p of points) {
    if (run.length && p[0] - run[run.length - 1][0] > gap) {
      out.push(run);
      run = [];
    }
    run.push(p);
  }
  if (run.length) out.push(run);
  return out;
}

function nearest(points, t) {
  let lo = 0;
  let hi = points.length - 1;
  if (hi < 0) return null;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < t) lo = mid + 1;
    else hi = mid;
  }
  const before = points[Math.max(0, lo - 1)];
  const after = points[lo];
  return Math.abs(before[0] - t) < Math.abs(after[0] - t) ? before : after;
}

const STEPS = [10e3, 30e3, 60e3, 2 * 60e3, 5 * 60e3, 15 * 60e3, 30 * 60e3, 3600e3, 3 * 3600e3, 6 * 3600e3, 12 * 3600e3, 86400e3];

/** Up to five labelled times on round boundaries, the first aligned left and the last right. */
function timeTicks(t0, t1, width) {
  const span = Math.max(1, t1 - t0);
  const wanted = Math.max(2, Math.min(5, Math.floor(width / 70)));
  const step = STEPS.find((s) => span / s <= wanted) || 86400e3 * Math.ceil(span / 86400e3 / wanted);
  const offset = new Date().getTimezoneOffset() * 60e3;
  const ticks = [];
  for (let t = Math.ceil((t0 - offset) / step) * step + offset; t <= t1; t += step) {
    const d = new Date(t);
    const pad = (n) => String(n).padStart(2, "0");
    const label = step >= 86400e3 ? d.toLocaleDateString(undefined, { weekday: "short", day: "numeric" })
      : step < 60e3 ? `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
        : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    const edge = (t - t0) / span;
    ticks.push([t, label, edge < 0.06 ? "left" : edge > 0.94 ? "right" : "center"]);
  }
  return ticks;
}

export function niceCeil(v) {
  if (v <= 4) return 4;
  const p = 10 ** Math.floor(Math.log10(v));
  // four grid steps of a round size: 0, 10, 20, 30, 40 rather than 0, 12.5, 25, …
  for (const m of [1, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

export function formatNum(v) {
  if (!Number.isFinite(v)) return "—";
  const a = Math.abs(v);
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 10000) return `${Math.round(v / 1000)}k`;
  if (a >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (Number.isInteger(v)) return String(v);
  return String(+v.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2));
}
