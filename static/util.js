// Small pure helpers shared by the dashboard modules. No DOM state lives here.

/**
 * Parse an event id into [ms, seq, partition]; null when malformed. On one Redis node an id is a
 * stream id "ms-seq"; on a cluster "partition:ms-seq". Ids only order events for display (roughly
 * by time across partitions); resuming uses the server's opaque cursors, never ids.
 */
export function parseStreamId(id) {
  if (typeof id !== "string") return null;
  const m = /^(?:(\d+):)?(\d+)-(\d+)$/.exec(id);
  if (!m) return null;
  return [Number(m[2]), Number(m[3]), m[1] === undefined ? 0 : Number(m[1])];
}

/** Compare two event ids: <0, 0, >0. Unparseable ids sort first. */
export function cmpStreamId(a, b) {
  const pa = parseStreamId(a);
  const pb = parseStreamId(b);
  if (!pa && !pb) return 0;
  if (!pa) return -1;
  if (!pb) return 1;
  return pa[0] - pb[0] || pa[1] - pb[1] || pa[2] - pb[2];
}

/** Timestamps arrive as epoch seconds (number or decimal string), epoch ms, or ISO text. Returns epoch ms or null. */
export function toEpochMs(value) {
  if (value === null || value === undefined || value === "") return null;
  let n = typeof value === "number" ? value : Number(value);
  if (typeof value === "string" && !Number.isFinite(n)) {
    const parsed = Date.parse(value);
    return Number.isFinite(parsed) ? parsed : null;
  }
  if (!Number.isFinite(n) || n <= 0) return null;
  return n > 1e12 ? n : n * 1000;
}

/** "12s ago", "5m 3s ago", "2h 4m ago", "3d 1h ago"; "never" without a time. */
export function formatAgo(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return "never";
  let s = Math.max(0, Math.floor((now - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  const m = Math.floor(s / 60);
  s %= 60;
  if (m < 60) return `${m}m ${s}s ago`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${m % 60}m ago`;
  return `${Math.floor(h / 24)}d ${h % 24}h ago`;
}

export function formatClock(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function formatDateTime(ms) {
  if (ms === null || ms === undefined) return "—";
  try {
    return new Date(ms).toLocaleString();
  } catch {
    return String(ms);
  }
}

export function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

/** Create an element: h("div", {class: "x", dataset: {a: 1}}, child, "text"). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** "title: detail" from a problem+json body, falling back to what we have. */
export function problemText(problem, status) {
  if (isPlainObject(problem)) {
    const title = typeof problem.title === "string" ? problem.title : "";
    const detail = typeof problem.detail === "string" ? problem.detail : "";
    if (title && detail) return `${title}: ${detail}`;
    if (title || detail) return title || detail;
  }
  return status ? `Request failed (HTTP ${status})` : "Request failed (network error)";
}
