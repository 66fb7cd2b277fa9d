// A tiny canvas line chart of the online count, one sample per second, ~10 minutes kept.

export class OnlineChart {
  constructor(canvas, { capacity = 600, label = "online" } = {}) {
    this.canvas = canvas;
    this.capacity = capacity;
    this.label = label;
    this.samples = []; // {t, v}
    this.dirty = true;
    if (typeof ResizeObserver === "function") {
      new ResizeObserver(() => this.draw()).observe(canvas);
    }
  }

  push(value, t = Date.now()) {
    if (!Number.isFinite(value)) return;
    this.samples.push({ t, v: value });
    if (this.samples.length > this.capacity) this.samples.splice(0, this.samples.length - this.capacity);
    this.canvas.dataset.samples = String(this.samples.length);
    this.canvas.dataset.latest = String(value);
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
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);

    const styles = getComputedStyle(c);
    const line = styles.getPropertyValue("--chart-line").trim() || "#1a7f37";
    const fill = styles.getPropertyValue("--chart-fill").trim() || "rgba(26,127,55,0.12)";
    const grid = styles.getPropertyValue("--chart-grid").trim() || "#e3e6ea";
    const text = styles.getPropertyValue("--chart-text").trim() || "#57606a";

    const padL = 40, padR = 8, padT = 8, padB = 18;
    const w = cssW - padL - padR;
    const hh = cssH - padT - padB;
    const now = Date.now();
    const span = this.capacity * 1000;
    const t0 = now - span;

    const pts = this.samples.filter((s) => s.t >= t0);
    let max = 1;
    for (const s of pts) if (s.v > max) max = s.v;
    max = niceCeil(max);

    ctx.font = "11px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
    ctx.fillStyle = text;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      const y = padT + hh - (hh * i) / 4;
      ctx.beginPath();
      ctx.moveTo(padL, Math.round(y) + 0.5);
      ctx.lineTo(padL + w, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillText(formatNum(v), padL - 4, y);
    }
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    ctx.fillText(`-${Math.round(span / 60000)}m`, padL, padT + hh + 4);
    ctx.textAlign = "right";
    ctx.fillText("now", padL + w, padT + hh + 4);

    if (pts.length === 0) return;
    const x = (t) => padL + ((t - t0) / span) * w;
    const y = (v) => padT + hh - (v / max) * hh;
    ctx.beginPath();
    pts.forEach((s, i) => (i === 0 ? ctx.moveTo(x(s.t), y(s.v)) : ctx.lineTo(x(s.t), y(s.v))));
    ctx.strokeStyle = line;
    ctx.lineWidth = 1.5;
    ctx.stroke();
    ctx.lineTo(x(pts[pts.length - 1].t), padT + hh);
    ctx.lineTo(x(pts[0].t), padT + hh);
    ctx.closePath();
    ctx.fillStyle = fill;
    ctx.fill();
  }
}

function niceCeil(v) {
  if (v <= 4) return 4;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function formatNum(v) {
  if (v >= 10000) return `${Math.round(v / 1000)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  return String(Math.round(v));
}
