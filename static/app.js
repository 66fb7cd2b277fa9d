// Fleet dashboard: live device grid over /ws/dashboard, counters, chart, presence log, device panel.
// Plain ES modules, no build step. State changes are applied at once; the DOM is updated once per frame.

import { api, setAuthHandler } from "./api.js";
import { OnlineChart } from "./chart.js";
import { VirtualList } from "./grid.js";
import { DevicePanel } from "./panel.js";
import {
  cmpStreamId, formatAgo, formatClock, h, isPlainObject, parseStreamId, toEpochMs,
} from "./util.js";

const LOG_CAP = 500;
const ROW_HEIGHT = 34;
const BACKOFF_MIN = 500;
const BACKOFF_MAX = 10000;
const PING_EVERY = 20000;
const SILENCE_LIMIT = 50000;
const FILL_PAGE = 1000;
const FILL_MAX_PAGES = 200;

const $ = (id) => document.getElementById(id);

// ---- state ---------------------------------------------------------------------------------------

const state = {
  /** id -> {device_id, lid, device_type, status, last_seen (ms|null), version, pv} */
  devices: new Map(),
  sortedIds: [], // every known id, sorted by id
  types: new Set(),
  counts: { registered: 0, online: 0, offline: 0 },
  truncated: false, // snapshot incomplete: counts come from server stats, adjusted by events
  haveSnapshot: false,
  cursor: null, // where live delivery stands: the snapshot's cursor, then each live frame's (opaque)
  connection: "connecting",
  filter: { text: "", type: "", status: "", sort: "id" },
  view: [], // ids currently listed, filtered and sorted
  log: [], // presence log entries, newest first
  selected: null,
};

const dirty = { view: false, counts: false, types: false };
const logIds = new Set();
let pendingLog = [];
let flushScheduled = false;

window.dashboard = {
  state,
  get cursor() {
    return state.cursor;
  },
  get connection() {
    return state.connection;
  },
  get ws() {
    return ws;
  },
  openDevice: (id) => openDevice(id),
  reconnect: () => connect(),
};

// ---- device bookkeeping --------------------------------------------------------------------------

function lowerBound(arr, id) {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function validId(id) {
  return typeof id === "string" && id.length > 0 && id.length <= 256;
}

function makeDevice(src) {
  const status = src.status === "online" ? "online" : "offline";
  const d = {
    device_id: src.device_id,
    lid: src.device_id.toLowerCase(),
    device_type: typeof src.device_type === "string" ? src.device_type : "",
    status,
    last_seen: toEpochMs(src.last_seen),
    version: Number.isFinite(Number(src.version)) ? Number(src.version) : null,
    pv: undefined,
  };
  if (d.device_type) state.types.add(d.device_type);
  return d;
}

/** Adds a device that is not yet known. */
function addDevice(d) {
  state.devices.set(d.device_id, d);
  const i = lowerBound(state.sortedIds, d.device_id);
  if (state.sortedIds[i] !== d.device_id) state.sortedIds.splice(i, 0, d.device_id);
  if (d.device_type && !state.types.has(d.device_type)) state.types.add(d.device_type);
  dirty.types = true;
}

function removeDevice(id) {
  const d = state.devices.get(id);
  if (!d) return null;
  state.devices.delete(id);
  const i = lowerBound(state.sortedIds, id);
  if (state.sortedIds[i] === id) state.sortedIds.splice(i, 1);
  return d;
}

/** Status change with counter bookkeeping for the truncated (stats-based) mode. */
function setStatus(d, status) {
  if (d.status === status) return;
  if (state.truncated) {
    const delta = status === "online" ? 1 : -1;
    state.counts.online = Math.max(0, state.counts.online + delta);
    state.counts.offline = Math.max(0, state.counts.offline - delta);
  }
  d.status = status;
}

function markChanged() {
  dirty.view = true;
  dirty.counts = true;
}

// ---- snapshot and events -------------------------------------------------------------------------

function applyStats(stats) {
  if (!isPlainObject(stats)) return;
  const n = (v) => (Number.isFinite(Number(v)) ? Number(v) : 0);
  if (state.truncated) {
    state.counts = { registered: n(stats.registered), online: n(stats.online), offline: n(stats.offline) };
  }
  if (isPlainObject(stats.by_type)) {
    for (const t of Object.keys(stats.by_type)) {
      if (!state.types.has(t)) {
        state.types.add(t);
        dirty.types = true;
      }
    }
  }
  dirty.counts = true;
}

function applySnapshot(msg, sock) {
  signedIn = true;
  const previousCursor = state.cursor;
  const oldPv = new Map();
  for (const [id, d] of state.devices) if (d.pv !== undefined) oldPv.set(id, d.pv);

  state.devices.clear();
  const ids = [];
  for (const raw of Array.isArray(msg.devices) ? msg.devices : []) {
    if (!isPlainObject(raw) || !validId(raw.device_id)) continue;
    const d = makeDevice(raw);
    // Presence versions only increase (even across re-registration), so an old one still guards order.
    if (oldPv.has(d.device_id)) d.pv = oldPv.get(d.device_id);
    if (!state.devices.has(d.device_id)) ids.push(d.device_id);
    state.devices.set(d.device_id, d);
  }
  ids.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  state.sortedIds = ids;
  state.truncated = msg.truncated === true;
  state.haveSnapshot = true;
  const cursor = typeof msg.cursor === "string" && msg.cursor ? msg.cursor : null;
  state.cursor = cursor;
  applyStats(msg.stats);
  if (!state.truncated) recount();
  dirty.types = true;
  markChanged();

  // Fill the event log with what we missed while away (the state itself is already current):
  // the gateway replays what lies between our last cursor and this snapshot, as a replay frame.
  const firstOnThisSocket = !sock.gotSnapshot;
  sock.gotSnapshot = true;
  if (firstOnThisSocket && previousCursor && msg.reason !== "resume_gap" && previousCursor !== cursor) {
    send(sock, { type: "resume", after: previousCursor });
  }

  $("truncated-note").hidden = !state.truncated;
  if (state.truncated) fillTruncated();
  else fillGeneration++;

  attempts = 0;
  setConnection("connected");
  if (msg.reason === "resume_gap") console.info("dashboard: resume gap, fresh snapshot applied");
  if (state.selected) panel.notify({ type: "snapshot", device_id: state.selected });
}

/** One event; a replayed one (from before the current snapshot) only fills the event log. */
function applyEvent(ev, replayed = false) {
  if (!isPlainObject(ev) || typeof ev.type !== "string") {
    console.warn("dashboard: ignoring malformed event", ev);
    return;
  }
  if (ev.type === "presence") queueLog(ev);
  if (replayed) return;
  if (!validId(ev.device_id)) {
    console.warn("dashboard: event without device_id", ev);
    return;
  }
  switch (ev.type) {
    case "presence":
      applyPresence(ev);
      break;
    case "state":
      applyState(ev);
      break;
    case "registered":
      applyRegistered(ev);
      break;
    case "deleted":
      applyDeleted(ev);
      break;
    case "metadata":
      break; // nothing listed depends on metadata; the panel reloads below
    default:
      console.info("dashboard: unknown event type", ev.type, ev);
      return;
  }
  panel.notify(ev);
}

function applyPresence(ev) {
  const status = ev.status === "online" ? "online" : ev.status === "offline" ? "offline" : null;
  if (!status) {
    console.warn("dashboard: presence event with unknown status", ev);
    return;
  }
  const v = Number(ev.version);
  const hasVersion = ev.version !== undefined && ev.version !== null && Number.isFinite(v);
  let d = state.devices.get(ev.device_id);
  if (d && hasVersion && d.pv !== undefined && v <= d.pv) return; // stale or duplicate
  if (!d) {
    // Unknown device: the snapshot was truncated, or it was registered behind the gateway's back.
    d = makeDevice({ device_id: ev.device_id, device_type: ev.device_type, status: status === "online" ? "offline" : "online" });
    if (state.truncated) {
      addDevice(d);
    } else {
      d.status = status;
      addDevice(d);
    }
  }
  if (hasVersion) d.pv = v;
  setStatus(d, status);
  if (status === "online") {
    const ts = toEpochMs(ev.timestamp);
    if (ts && (!d.last_seen || ts > d.last_seen)) d.last_seen = ts;
  }
  markChanged();
}

function applyState(ev) {
  const d = state.devices.get(ev.device_id);
  if (!d) return;
  const v = Number(ev.version);
  if (ev.version !== undefined && Number.isFinite(v)) d.version = v;
  if (ev.section === "reported") {
    const ts = toEpochMs(ev.timestamp);
    if (ts && (!d.last_seen || ts > d.last_seen)) d.last_seen = ts;
  }
  dirty.view = true;
}

function applyRegistered(ev) {
  let d = state.devices.get(ev.device_id);
  if (d) {
    if (typeof ev.device_type === "string" && ev.device_type) d.device_type = ev.device_type;
  } else {
    d = makeDevice({ device_id: ev.device_id, device_type: ev.device_type, status: "offline" });
    addDevice(d);
    if (state.truncated) {
      state.counts.registered += 1;
      state.counts.offline += 1;
    }
  }
  if (d.device_type && !state.types.has(d.device_type)) state.types.add(d.device_type);
  dirty.types = true;
  markChanged();
}

function applyDeleted(ev) {
  const d = removeDevice(ev.device_id);
  if (state.truncated) {
    state.counts.registered = Math.max(0, state.counts.registered - 1);
    if (d?.status === "online") state.counts.online = Math.max(0, state.counts.online - 1);
    else state.counts.offline = Math.max(0, state.counts.offline - 1);
  }
  markChanged();
}

/** The panel loaded a device: use it to correct our summary of that device. */
function mergeDeviceData(data) {
  if (!validId(data?.device_id)) return;
  let d = state.devices.get(data.device_id);
  if (!d) {
    d = makeDevice(data);
    d.status = state.truncated ? (data.status === "online" ? "offline" : "online") : d.status;
    addDevice(d);
  }
  if (typeof data.device_type === "string" && data.device_type && d.device_type !== data.device_type) {
    d.device_type = data.device_type;
    state.types.add(d.device_type);
    dirty.types = true;
  }
  const pv = Number(data.presence_version);
  const status = data.status === "online" ? "online" : data.status === "offline" ? "offline" : null;
  if (status && (d.pv === undefined || !Number.isFinite(pv) || pv >= d.pv)) {
    setStatus(d, status);
    if (Number.isFinite(pv)) d.pv = pv;
  }
  const seen = toEpochMs(data.last_seen);
  if (seen && (!d.last_seen || seen > d.last_seen)) d.last_seen = seen;
  if (Number.isFinite(Number(data.version))) d.version = Number(data.version);
  markChanged();
  scheduleFlush();
}

function recount() {
  let online = 0;
  for (const d of state.devices.values()) if (d.status === "online") online++;
  state.counts = { registered: state.devices.size, online, offline: state.devices.size - online };
}

// A truncated snapshot: page the rest of the fleet in the background (only adds unknown devices).
let fillGeneration = 0;
async function fillTruncated() {
  const gen = ++fillGeneration;
  let cursor = null;
  for (let page = 0; page < FILL_MAX_PAGES; page++) {
    const qs = new URLSearchParams({ limit: String(FILL_PAGE) });
    if (cursor) qs.set("cursor", cursor);
    const res = await api("GET", `/api/devices?${qs}`);
    if (gen !== fillGeneration || !res.ok || !isPlainObject(res.data)) break;
    const items = Array.isArray(res.data.items) ? res.data.items : Array.isArray(res.data.devices) ? res.data.devices : [];
    for (const raw of items) {
      if (!isPlainObject(raw) || !validId(raw.device_id) || state.devices.has(raw.device_id)) continue;
      addDevice(makeDevice(raw));
    }
    markChanged();
    scheduleFlush();
    cursor = res.data.next_cursor;
    if (!cursor || items.length === 0) break;
  }
  if (gen === fillGeneration) $("truncated-note").textContent = "The snapshot was truncated; counts come from the server's statistics.";
}

async function refreshStats() {
  const res = await api("GET", "/api/stats");
  if (res.ok && isPlainObject(res.data)) {
    applyStats(res.data);
    scheduleFlush();
  }
}

// ---- presence log --------------------------------------------------------------------------------

let localLogSeq = 0;
function queueLog(ev) {
  const id = parseStreamId(ev.id) ? ev.id : `local-${++localLogSeq}`;
  if (logIds.has(id)) return;
  logIds.add(id);
  pendingLog.push({
    id,
    device_id: typeof ev.device_id === "string" ? ev.device_id : "?",
    status: ev.status === "online" ? "online" : "offline",
    reason: typeof ev.reason === "string" ? ev.reason : "",
    ts: toEpochMs(ev.timestamp),
  });
  if (pendingLog.length > LOG_CAP * 2) {
    pendingLog.sort((a, b) => cmpStreamId(b.id, a.id));
    for (const dropped of pendingLog.splice(LOG_CAP)) logIds.delete(dropped.id);
  }
}

function flushLog() {
  if (!pendingLog.length) return;
  const ul = $("event-log");
  const log = state.log;
  for (const e of pendingLog) {
    let i = 0;
    if (parseStreamId(e.id)) while (i < log.length && cmpStreamId(log[i].id, e.id) > 0) i++;
    if (i >= LOG_CAP) {
      logIds.delete(e.id);
      continue;
    }
    log.splice(i, 0, e);
    ul.insertBefore(renderLogEntry(e), ul.children[i] || null);
    while (log.length > LOG_CAP) {
      logIds.delete(log.pop().id);
      ul.lastElementChild?.remove();
    }
  }
  pendingLog = [];
}

function renderLogEntry(e) {
  return h("li", { class: "log-entry", dataset: { eventId: e.id, deviceId: e.device_id, status: e.status } },
    h("time", { class: "log-time", title: e.ts ? new Date(e.ts).toISOString() : "" }, formatClock(e.ts)),
    h("span", { class: "dot", "aria-hidden": "true" }),
    h("button", { type: "button", class: "link log-device", onclick: () => openDevice(e.device_id) }, e.device_id),
    h("span", { class: "log-status" }, e.status),
    e.reason ? h("span", { class: "log-reason" }, e.reason) : null);
}

// ---- rendering -----------------------------------------------------------------------------------

function scheduleFlush() {
  if (flushScheduled) return;
  flushScheduled = true;
  requestAnimationFrame(flush);
}

function flush() {
  flushScheduled = false;
  try {
    if (dirty.counts) {
      dirty.counts = false;
      if (!state.truncated) recount();
      setText($("count-online"), String(state.counts.online));
      setText($("count-offline"), String(state.counts.offline));
      setText($("count-total"), String(state.counts.registered));
    }
    if (dirty.types) {
      dirty.types = false;
      renderTypeOptions();
    }
    if (dirty.view) {
      dirty.view = false;
      state.view = computeView();
      list.setItems(state.view);
      const total = state.devices.size;
      setText($("list-count"), total === 0 ? "No devices" :
        state.view.length === total ? `${total.toLocaleString()} devices` :
          `Showing ${state.view.length.toLocaleString()} of ${total.toLocaleString()} devices`);
    }
    flushLog();
  } catch (err) {
    console.error("dashboard: render failed", err);
  }
}

function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

function computeView() {
  const { text, type, status, sort } = state.filter;
  const q = text.trim().toLowerCase();
  const out = [];
  for (const id of state.sortedIds) {
    const d = state.devices.get(id);
    if (!d) continue;
    if (type && d.device_type !== type) continue;
    if (status && d.status !== status) continue;
    if (q && !d.lid.includes(q)) continue;
    out.push(id);
  }
  if (sort === "status") {
    const on = [];
    const off = [];
    for (const id of out) (state.devices.get(id).status === "online" ? on : off).push(id);
    return on.concat(off);
  }
  if (sort === "last_seen") {
    const seen = (id) => state.devices.get(id).last_seen ?? -Infinity;
    out.sort((a, b) => seen(b) - seen(a) || (a < b ? -1 : 1));
  }
  return out;
}

let typeSignature = "";
function renderTypeOptions() {
  const types = [...state.types].filter(Boolean).sort();
  const sig = types.join("\u0000");
  if (sig === typeSignature) return;
  typeSignature = sig;
  const sel = $("filter-type");
  const current = sel.value;
  const opts = [h("option", { value: "" }, "All types")];
  for (const t of types) opts.push(h("option", { value: t }, t));
  if (current && !types.includes(current)) opts.push(h("option", { value: current }, current));
  sel.replaceChildren(...opts);
  sel.value = current;
}

function createRow() {
  return h("div", { class: "row", role: "row", tabindex: "0" },
    h("span", { class: "cell status" }, h("span", { class: "dot", "aria-hidden": "true" }), h("span", { class: "status-text" })),
    h("span", { class: "cell id" }),
    h("span", { class: "cell type" }),
    h("span", { class: "cell seen" }));
}

function paintRow(row, id) {
  const d = state.devices.get(id);
  if (!d) return;
  if (row._id !== id) {
    row._id = id;
    row.dataset.deviceId = id;
    row.children[1].textContent = id;
    row.children[1].title = id;
    row._type = null;
    row._status = null;
  }
  if (row._status !== d.status) {
    row._status = d.status;
    row.dataset.status = d.status;
    row.children[0].children[1].textContent = d.status;
  }
  if (row._type !== d.device_type) {
    row._type = d.device_type;
    row.dataset.deviceType = d.device_type;
    row.children[2].textContent = d.device_type || "—";
  }
  const selected = state.selected === id;
  if (row._selected !== selected) {
    row._selected = selected;
    if (selected) row.dataset.selected = "true";
    else delete row.dataset.selected;
    row.setAttribute("aria-selected", selected ? "true" : "false");
  }
  paintSeen(row, d);
}

function paintSeen(row, d) {
  setText(row.children[3], d.last_seen ? `last seen ${formatAgo(d.last_seen)}` : "never seen");
}

// ---- connection ----------------------------------------------------------------------------------

let ws = null;
let attempts = 0;
let reconnectTimer = null;
let wantConnected = false;
let lastMessageAt = 0;

function setConnection(s, label) {
  state.connection = s;
  const el = $("conn-state");
  el.dataset.state = s;
  const text = label || { connected: "Connected", connecting: "Connecting…", disconnected: "Offline" }[s] || s;
  setText($("conn-label"), text);
}

function send(sock, obj) {
  try {
    if (sock && sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify(obj));
  } catch (err) {
    console.warn("dashboard: send failed", err);
  }
}

function dropSocket() {
  if (!ws) return;
  const old = ws;
  ws = null;
  old.onopen = old.onmessage = old.onclose = old.onerror = null;
  try {
    old.close(1000);
  } catch {
    /* already closed */
  }
}

function connect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  dropSocket();
  wantConnected = true;
  setConnection("connecting", attempts ? "Reconnecting…" : "Connecting…");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/dashboard`;
  let sock;
  try {
    sock = new WebSocket(url);
  } catch (err) {
    console.error("dashboard: cannot open WebSocket", err);
    scheduleReconnect();
    return;
  }
  ws = sock;
  sock.gotSnapshot = false;
  sock.opened = false;
  sock.onopen = () => {
    sock.opened = true;
    lastMessageAt = Date.now();
  };
  sock.onmessage = (e) => {
    if (sock !== ws) return;
    lastMessageAt = Date.now();
    handleFrame(e.data, sock);
  };
  sock.onerror = () => {}; // a close event always follows
  sock.onclose = (e) => {
    if (sock !== ws) return;
    ws = null;
    handleClose(e.code, e.reason, sock);
  };
}

async function handleClose(code, reason, sock) {
  if (!wantConnected) {
    setConnection("disconnected");
    return;
  }
  if (code === 4401 || code === 1008) {
    authRequired(reason ? `Please sign in (${reason}).` : "Please sign in.");
    return;
  }
  if (code === 4403) {
    wantConnected = false;
    setConnection("disconnected", "Refused");
    showNotice(`The gateway refused this page's origin (4403)${reason ? `: ${reason}` : ""}.`, true);
    return;
  }
  if (code === 4408) showNotice("The gateway dropped this dashboard for falling behind; reconnecting.");
  else if (code === 1012) showNotice("The gateway is restarting; reconnecting.");
  if (!sock.gotSnapshot) {
    // The handshake may have been refused for auth (browsers only report 1006): ask the REST API.
    const res = await api("GET", "/api/stats");
    if (res.status === 401 || !wantConnected || ws) return;
  }
  scheduleReconnect();
}

function scheduleReconnect() {
  clearTimeout(reconnectTimer);
  if (!wantConnected) return;
  const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempts);
  const delay = Math.round(base / 2 + Math.random() * (base / 2));
  attempts++;
  const offline = navigator.onLine === false;
  setConnection(offline ? "disconnected" : "connecting",
    offline ? "Offline, waiting for network…" : `Reconnecting in ${Math.max(1, Math.round(delay / 1000))}s…`);
  reconnectTimer = setTimeout(connect, delay);
}

function handleFrame(raw, sock) {
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    console.warn("dashboard: non-JSON frame", raw);
    return;
  }
  if (!isPlainObject(msg)) {
    console.warn("dashboard: unexpected frame", msg);
    return;
  }
  try {
    switch (msg.type) {
      case "snapshot":
        applySnapshot(msg, sock);
        break;
      case "events":
        if (Array.isArray(msg.events)) {
          const replayed = msg.replay === true;
          for (const ev of msg.events) {
            try {
              applyEvent(ev, replayed);
            } catch (err) {
              console.error("dashboard: failed to apply event", err, ev);
            }
          }
          // live frames come in order; a replay's cursor is behind the live one
          if (!replayed && typeof msg.cursor === "string" && msg.cursor) state.cursor = msg.cursor;
        } else console.warn("dashboard: events frame without events", msg);
        break;
      case "presence":
      case "state":
      case "registered":
      case "deleted":
      case "metadata":
        applyEvent(msg);
        break;
      case "error":
        showNotice(`Gateway error${msg.code !== undefined ? ` ${msg.code}` : ""}: ${msg.message ?? "unknown"}`);
        break;
      case "pong":
      case "subscribed":
        break;
      default:
        console.info("dashboard: unknown frame type", msg.type, msg);
    }
  } catch (err) {
    console.error("dashboard: failed to handle frame", err, msg);
  }
  scheduleFlush();
}

// ---- auth ----------------------------------------------------------------------------------------

function authRequired(message) {
  wantConnected = false;
  clearTimeout(reconnectTimer);
  dropSocket();
  setConnection("disconnected", "Signed out");
  $("login-overlay").hidden = false;
  $("login-form").hidden = false;
  const err = $("login-error");
  err.textContent = message || "";
  err.hidden = !message;
  setTimeout(() => $("login-key").focus(), 0);
}

let signedIn = false;

const READ_ONLY_REASON = "read-only API key: writes need an admin key";

function start() {
  $("login-form").hidden = true;
  $("login-overlay").hidden = true;
  attempts = 0;
  connect();
  refreshStats();
  loadRole();
}

/** Ask what this session's key may do; write controls stay disabled until it is known. */
async function loadRole() {
  document.body.dataset.role = "unknown";
  panel.setReadOnly(true, "checking what this API key may do…");
  const res = await api("GET", "/api/session");
  if (res.status === 401) return; // the auth handler asks to sign in
  // on any other failure the controls come back: the gateway still refuses what a key may not do
  const role = res.ok && res.data?.role === "read" ? "read" : "admin";
  document.body.dataset.role = role;
  panel.setReadOnly(role === "read", READ_ONLY_REASON);
}

async function login(event) {
  event.preventDefault();
  const input = $("login-key");
  const key = input.value.trim();
  const err = $("login-error");
  if (!key) {
    err.textContent = "Enter an API key.";
    err.hidden = false;
    return;
  }
  const btn = $("login-submit");
  btn.disabled = true;
  const res = await api("POST", "/api/session", { api_key: key }, { authHook: false });
  btn.disabled = false;
  if (!res.ok) {
    err.textContent = res.message;
    err.hidden = false;
    input.select();
    return;
  }
  input.value = "";
  err.hidden = true;
  start();
}

async function logout() {
  await api("DELETE", "/api/session", undefined, { authHook: false });
  authRequired("Signed out.");
}

// ---- notices -------------------------------------------------------------------------------------

let noticeTimer = null;
function showNotice(text, sticky = false) {
  $("notice-text").textContent = text;
  $("notice").hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => ($("notice").hidden = true), 10000);
}

// ---- panel ---------------------------------------------------------------------------------------

const panel = new DevicePanel({
  onClose: () => {
    state.selected = null;
    list.render();
  },
  onData: mergeDeviceData,
});

function openDevice(id) {
  if (!validId(id)) return;
  state.selected = id;
  panel.open(id);
  list.render();
}

// ---- wiring --------------------------------------------------------------------------------------

const list = new VirtualList($("device-list"), {
  rowHeight: ROW_HEIGHT,
  createRow,
  paintRow,
  onActivate: openDevice,
  emptyText: "No devices match the filters.",
});

const chart = new OnlineChart($("online-chart"), { capacity: 600 });

function bindFilters() {
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  const update = () => {
    state.filter = {
      text: $("filter-text").value,
      type: $("filter-type").value,
      status: $("filter-status").value,
      sort: $("sort-by").value,
    };
    dirty.view = true;
    scheduleFlush();
  };
  $("filter-text").addEventListener("input", update);
  for (const id of ["filter-type", "filter-status", "sort-by"]) $(id).addEventListener("change", update);
}

function everySecond() {
  const now = Date.now();
  if (state.haveSnapshot) {
    chart.push(state.counts.online, now);
    setText($("chart-now"), `(${state.counts.online} now)`);
  }
  if (!document.hidden) {
    list.forEachRendered((row, id) => {
      const d = state.devices.get(id);
      if (d) paintSeen(row, d);
    });
    panel.tick();
  }
  if (state.filter.sort === "last_seen") dirty.view = true;
  // Keep the socket honest: ping, and give up on a connection that has gone silent.
  if (ws && ws.readyState === WebSocket.OPEN) {
    if (now - lastMessageAt > SILENCE_LIMIT) {
      console.warn("dashboard: connection silent, reconnecting");
      const sock = ws;
      ws = null;
      sock.onclose = sock.onmessage = null;
      try {
        sock.close(4000, "silent");
      } catch {
        /* ignore */
      }
      scheduleReconnect();
    } else if (now - (ws.lastPing || lastMessageAt) > PING_EVERY) {
      ws.lastPing = now;
      send(ws, { type: "ping" });
    }
  }
  scheduleFlush();
}

async function boot() {
  // a first visit without a session just asks to sign in; a session that ended says so
  setAuthHandler(() => authRequired(signedIn ? "Your session ended: sign in again." : ""));
  bindFilters();
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("notice-close").addEventListener("click", () => ($("notice").hidden = true));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && panel.isOpen && !$("device-panel").contains(document.activeElement)) panel.close();
  });
  window.addEventListener("online", () => {
    if (wantConnected && !ws) connect();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      dirty.view = true;
      scheduleFlush();
      chart.draw();
    }
  });
  setInterval(everySecond, 1000);
  setInterval(() => {
    if (state.truncated && state.connection === "connected") refreshStats();
  }, 15000);

  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token !== null) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(history.state, "", `${location.pathname}${rest ? `?${rest}` : ""}${location.hash}`);
    const res = await api("POST", "/api/session", { api_key: token }, { authHook: false });
    if (!res.ok) {
      authRequired(res.message);
      return;
    }
  }
  start();
}

boot().catch((err) => console.error("dashboard: boot failed", err));
