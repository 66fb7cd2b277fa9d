// Fleet dashboard: live device grid over /ws/dashboard, counters, the fleet over time, the
// presence log, the device panel and device management. Plain ES modules, no build step.
// State changes are applied at once; the DOM is updated once per frame.
//
// A fleet that fits in the snapshot (up to 10,000 devices by default) is filtered and sorted
// here. A larger one is listed by the server: the filters become API queries (id prefix, type,
// status) answered in cursor pages, and the next page loads as the list scrolls near its end.

import { api, setAuthHandler } from "./api.js";
import { PresenceLog } from "./eventlog.js";
import { FleetCard } from "./fleet.js";
import { VirtualList } from "./grid.js";
import { Manager } from "./manage.js";
import { DevicePanel } from "./panel.js";
import { formatAgo, h, isPlainObject, toEpochMs } from "./util.js";

const LOG_CAP = 1000;
const ROW_HEIGHT = 34;
const BACKOFF_MIN = 500;
const BACKOFF_MAX = 10000;
const PING_EVERY = 20000;
const SILENCE_LIMIT = 50000;
const SERVER_PAGE = 500;
const PAGE_AHEAD_ROWS = 200; // the next page loads when the view comes this close to its end
const STATS_EVERY_MS = 5000; // counts of a fleet too large for the page come from the server

const $ = (id) => document.getElementById(id);

// ---- state ---------------------------------------------------------------------------------------

const state = {
  /** id -> {device_id, device_type, status, last_seen (ms|null), version, pv} */
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
  byType: {}, // the server's counts per type (a fleet larger than the snapshot)
  selected: null,
  // a fleet larger than the snapshot: the list is the server's pages for the current filters
  server: { ids: [], listed: new Set(), cursor: null, done: true, loading: false, generation: 0 },
};

const dirty = { view: false, counts: false, types: false };
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
  get log() {
    return presenceLog;
  },
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
  if (isPlainObject(stats.by_type)) state.byType = stats.by_type;
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
  const listed = [...ids]; // the server's order (on a cluster: partition, then id)
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

  const note = $("truncated-note");
  note.hidden = !state.truncated;
  note.textContent = state.truncated ? "Large fleet: filters and search are answered by the server, in id order." : "";
  $("sort-by").disabled = state.truncated;
  $("sort-by").title = state.truncated ? "Sorting needs the whole fleet in the page; a large fleet is listed in id order" : "";
  if (state.truncated) {
    const next = typeof msg.next_cursor === "string" && msg.next_cursor ? msg.next_cursor : null;
    serverReset(filtered() ? null : { ids: listed, next });
  }

  // The log starts with the events this snapshot reflects, read back from its cursor: live
  // events come after it, so nothing is missing or doubled where the two meet.
  if (cursor && (presenceLog.next === undefined || msg.reason === "resume_gap")) presenceLog.loadLatest(cursor).then(scheduleFlush);

  attempts = 0;
  setConnection("connected");
  fleet.tick(state.counts.online, countsByType()); // counts and bars with the first frame
  if (msg.reason === "resume_gap") console.info("dashboard: resume gap, fresh snapshot applied");
  if (state.selected) panel.notify({ type: "snapshot", device_id: state.selected });
}

/** One event; a replayed one (from before the current snapshot) only fills the event log. */
function applyEvent(ev, replayed = false) {
  if (!isPlainObject(ev) || typeof ev.type !== "string") {
    console.warn("dashboard: ignoring malformed event", ev);
    return;
  }
  if (ev.type === "presence") presenceLog.add(ev);
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
    case "command":
      break; // only the panel shows commands
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
      // listed at once only when the server's list has reached its end: it is in id order
      if (state.server.done && matches(d)) serverAdd(d.device_id);
    }
  }
  if (d.device_type && !state.types.has(d.device_type)) state.types.add(d.device_type);
  dirty.types = true;
  markChanged();
}

function applyDeleted(ev) {
  const d = removeDevice(ev.device_id);
  if (state.server.listed.delete(ev.device_id)) {
    const i = state.server.ids.indexOf(ev.device_id);
    if (i >= 0) state.server.ids.splice(i, 1);
  }
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

async function refreshStats() {
  const res = await api("GET", "/api/stats");
  if (res.ok && isPlainObject(res.data)) {
    applyStats(res.data);
    scheduleFlush();
  }
}

// ---- a fleet larger than the snapshot: the server's pages ---------------------------------------

function filtered() {
  const { text, type, status } = state.filter;
  return Boolean(text.trim() || type || status);
}

/** Does a device match the filters (an id prefix, type, status)? */
function matches(d) {
  const { text, type, status } = state.filter;
  const prefix = text.trim();
  return (!type || d.device_type === type) && (!status || d.status === status) && (!prefix || d.device_id.startsWith(prefix));
}

/** Start the list over: from a snapshot's first devices (no filter), or the first page. */
function serverReset(start) {
  const server = state.server;
  server.generation++;
  server.ids = start ? [...start.ids] : [];
  server.listed = new Set(server.ids);
  server.cursor = start ? start.next : null;
  server.done = start ? !start.next : false;
  server.loading = false;
  dirty.view = true;
  if (!start) loadServerPage();
}

function serverAdd(id) {
  if (state.server.listed.has(id)) return;
  state.server.listed.add(id);
  state.server.ids.push(id);
}

/** The next page of the current filters; pages walk the indexes, so each costs a page. */
async function loadServerPage() {
  const server = state.server;
  if (server.loading || server.done) return;
  const generation = server.generation;
  server.loading = true;
  const { text, type, status } = state.filter;
  const query = new URLSearchParams({ limit: String(SERVER_PAGE) });
  if (text.trim()) query.set("prefix", text.trim());
  if (type) query.set("type", type);
  if (status) query.set("status", status);
  if (server.cursor) query.set("cursor", server.cursor);
  const res = await api("GET", `/api/devices?${query}`);
  if (generation !== server.generation) return;
  server.loading = false;
  if (!res.ok || !isPlainObject(res.data) || !Array.isArray(res.data.items)) {
    server.done = true;
    setText($("list-count"), res.status === 422 ? `Search: ${res.message}` : `Could not list devices: ${res.message}`);
    return;
  }
  for (const raw of res.data.items) {
    if (!isPlainObject(raw) || !validId(raw.device_id)) continue;
    if (!state.devices.has(raw.device_id)) state.devices.set(raw.device_id, makeDevice(raw));
    serverAdd(raw.device_id);
  }
  server.cursor = typeof res.data.next_cursor === "string" ? res.data.next_cursor : null;
  server.done = server.cursor === null;
  markChanged();
  scheduleFlush();
}

/** The list shows rows up to *last*: fetch ahead while the view nears the end of what is loaded. */
function onListRange(first, last) {
  if (!state.truncated) return;
  const server = state.server;
  if (!server.done && !server.loading && last > server.ids.length - PAGE_AHEAD_ROWS) loadServerPage();
}

/** Online and registered counts per type: counted here, or the server's for a large fleet. */
function countsByType() {
  if (state.truncated) return state.byType;
  const out = {};
  for (const d of state.devices.values()) {
    const type = d.device_type || "(none)";
    const c = out[type] || (out[type] = { registered: 0, online: 0, offline: 0 });
    c.registered++;
    if (d.status === "online") c.online++;
    else c.offline++;
  }
  return out;
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
      if (state.truncated) {
        state.view = state.server.ids;
        list.setItems(state.view);
        const total = state.counts.registered;
        const loaded = state.view.length.toLocaleString();
        const more = state.server.done ? "" : " (more as you scroll)";
        setText($("list-count"), filtered() ? `${loaded} matching devices loaded${more}` :
          `${loaded} of ${total.toLocaleString()} devices loaded${more}`);
      } else {
        state.view = computeView();
        list.setItems(state.view);
        const total = state.devices.size;
        setText($("list-count"), total === 0 ? "No devices" :
          state.view.length === total ? `${total.toLocaleString()} devices` :
            `Showing ${state.view.length.toLocaleString()} of ${total.toLocaleString()} devices`);
      }
      $("device-list").setAttribute("aria-rowcount", String(state.view.length));
    }
    presenceLog.flush();
    markReady();
  } catch (err) {
    console.error("dashboard: render failed", err);
  }
}

/** The first frame with the list, the counts, the fleet's past and the latest events drawn:
 * a `dashboard-ready` performance mark (loadtest.bench_dashboard reads it). */
let readyMarked = false;
function markReady() {
  if (readyMarked || !state.haveSnapshot || !fleet.doc || presenceLog.next === undefined) return;
  if (state.devices.size && !document.querySelector("#device-list .row[data-device-id]")) return;
  readyMarked = true;
  performance.mark("dashboard-ready");
  document.body.dataset.ready = "true";
}

function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

function computeView() {
  const { sort } = state.filter;
  const out = [];
  for (const id of state.sortedIds) {
    const d = state.devices.get(id);
    if (d && matches(d)) out.push(id);
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
    h("span", { class: "cell status", role: "gridcell" }, h("span", { class: "dot", "aria-hidden": "true" }), h("span", { class: "status-text" })),
    h("span", { class: "cell id", role: "gridcell" }),
    h("span", { class: "cell type", role: "gridcell" }),
    h("span", { class: "cell seen", role: "gridcell" }, h("span", { class: "seen-label" }, "last seen "), h("span", { class: "seen-ago" })));
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
  const [label, ago] = row.children[3].children;
  label.hidden = !d.last_seen;
  setText(ago, d.last_seen ? formatAgo(d.last_seen) : "never seen");
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
      case "command":
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
  fleet.load().then(scheduleFlush); // the fleet's past is on the first paint, beside the snapshot
}

/** Ask what this session's key may do; write controls stay disabled until it is known. */
async function loadRole() {
  document.body.dataset.role = "unknown";
  setReadOnly(true, "checking what this API key may do…");
  const res = await api("GET", "/api/session");
  if (res.status === 401) return; // the auth handler asks to sign in
  // on any other failure the controls come back: the gateway still refuses what a key may not do
  const role = res.ok && res.data?.role === "read" ? "read" : "admin";
  document.body.dataset.role = role;
  setReadOnly(role === "read", READ_ONLY_REASON);
}

/** Every write control on the page (register, edit, rotate, delete, apply) off, saying why. */
function setReadOnly(readOnly, reason) {
  for (const el of document.querySelectorAll("[data-write]")) {
    el.disabled = readOnly;
    if (readOnly) el.title = reason;
    else el.removeAttribute("title");
  }
  panel.setReadOnly(readOnly, reason);
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

const manager = new Manager({
  notice: (text) => showNotice(text),
  onDeleted: (id) => {
    if (panel.deviceId === id) panel.close();
  },
  knownTypes: () => [...state.types].filter(Boolean).sort(),
});

const panel = new DevicePanel({
  onClose: (id) => {
    state.selected = null;
    list.render();
    if (!document.querySelector("dialog[open]") && id) list.focusId(id);
  },
  onData: mergeDeviceData,
  onRotate: (id) => manager.rotate(id),
  onDelete: (id) => manager.remove(id),
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
  onRange: onListRange,
  emptyText: "No devices match the filters.",
});

const fleet = new FleetCard({
  canvas: $("online-chart"),
  readout: $("chart-readout"),
  legend: $("chart-legend"),
  bars: $("type-bars"),
  now: $("chart-now"),
  buttons: [...document.querySelectorAll(".segmented [data-range]")],
});

const presenceLog = new PresenceLog({
  list: $("event-log"),
  older: $("log-older"),
  status: $("log-state"),
  cap: LOG_CAP,
  onOpen: (id) => openDevice(id),
});

function bindFilters() {
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  const update = () => {
    state.filter = {
      text: $("filter-text").value,
      type: $("filter-type").value,
      status: $("filter-status").value,
      sort: $("sort-by").value,
    };
    if (state.truncated) serverReset(null);
    dirty.view = true;
    scheduleFlush();
  };
  // typing waits for a pause before the server is asked (a large fleet); local filters are instant
  let typing = null;
  $("filter-text").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(update, state.truncated ? 200 : 0);
  });
  for (const id of ["filter-type", "filter-status", "sort-by"]) $(id).addEventListener("change", update);
}

function everySecond() {
  const now = Date.now();
  if (state.haveSnapshot) fleet.tick(state.counts.online, countsByType());
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
    if (e.key !== "Escape" || !panel.isOpen || document.querySelector("dialog[open]")) return;
    const editing = document.activeElement?.matches?.("textarea, input");
    if (!editing) panel.close();
  });
  window.addEventListener("online", () => {
    if (wantConnected && !ws) connect();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      dirty.view = true;
      scheduleFlush();
      fleet.render();
    }
  });
  setInterval(everySecond, 1000);
  setInterval(() => {
    if (state.truncated && state.connection === "connected") refreshStats();
  }, STATS_EVERY_MS);

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
