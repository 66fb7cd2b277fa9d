// The per-device panel: metadata, reported, desired, delta (highlighted) and the desired-state editor.
// The editor's precondition is the desired section's own version (`desired_version`): the device's
// reports move the shadow version every few seconds, but never the desired section, so an edit
// conflicts only when someone else changed the desired state.

import { api } from "./api.js";
import { CommandsView } from "./commands.js";
import { DAY_MS, LeafPlots, presencePeriods, renderTimeline } from "./timeline.js";
import { formatAgo, formatClock, formatDateTime, h, isPlainObject, toEpochMs } from "./util.js";

const HISTORY_FETCH = 500; // per request: two requests cover the default history of 1,000
const HISTORY_SHOWN = 50; // list items per "Show older"
const HISTORY_REFRESH_MS = 1000;
const MIN_SPAN_MS = 60e3; // the shortest timeline: a minute

const $ = (id) => document.getElementById(id);

export class DevicePanel {
  /** @param {{onClose?:(id:string)=>void, onData?:(data:object)=>void, onRotate?:(id:string)=>void, onDelete?:(id:string)=>void}} hooks */
  constructor(hooks = {}) {
    this.hooks = hooks;
    this.root = $("device-panel");
    this.el = {
      title: $("panel-title"),
      type: $("panel-type"),
      status: $("panel-status"),
      version: $("panel-version"),
      desiredVersion: $("panel-desired-version"),
      reportedVersion: $("panel-reported-version"),
      presenceVersion: $("panel-presence-version"),
      lastSeen: $("panel-last-seen"),
      registered: $("panel-registered"),
      error: $("panel-error"),
      metadata: $("panel-metadata"),
      reported: $("panel-reported"),
      desired: $("panel-desired"),
      delta: $("panel-delta"),
      stale: $("panel-stale"),
      editor: $("desired-editor"),
      baseVersion: $("desired-base-version"),
      apply: $("desired-apply"),
      result: $("desired-result"),
      form: $("desired-form"),
      readOnly: $("panel-read-only"),
      flapping: $("panel-flapping"),
      timeline: $("panel-timeline"),
      timelineTitle: $("timeline-title"),
      timelineSummary: $("timeline-summary"),
      history: $("panel-history"),
      historyOlder: $("history-older"),
      historyState: $("history-state"),
      metadataEdit: $("metadata-edit"),
      metadataForm: $("metadata-form"),
      metadataEditor: $("metadata-editor"),
      metadataResult: $("metadata-result"),
    };
    this.plots = new LeafPlots($("panel-plots"));
    this.commands = new CommandsView();
    this.history = this.emptyHistory();
    this.historyTimer = null;
    this.timelineDrawnAt = 0;
    this.deviceId = null;
    this.data = null;
    this.baseVersion = null; // the desired_version the editor's patch is based on
    this.readOnly = false; // a read-only key: every write control disabled, with the reason
    this.seq = 0; // guards against late responses for a previously opened device
    this.loading = false;
    this.pendingRefresh = false;
    this.refreshTimer = null;
    this.applying = false;

    $("panel-close")?.addEventListener("click", () => this.close());
    $("panel-refresh")?.addEventListener("click", () => {
      this.refresh();
      this.loadHistory();
    });
    this.el.historyOlder.addEventListener("click", () => this.showOlder());
    this.el.metadataEdit.addEventListener("click", () => this.editMetadata());
    $("metadata-cancel").addEventListener("click", () => this.closeMetadata());
    this.el.metadataForm.addEventListener("submit", (e) => {
      e.preventDefault();
      this.saveMetadata();
    });
    $("token-rotate").addEventListener("click", () => this.deviceId && this.hooks.onRotate?.(this.deviceId));
    $("device-delete").addEventListener("click", () => this.deviceId && this.hooks.onDelete?.(this.deviceId));
    this.el.form?.addEventListener("submit", (e) => {
      e.preventDefault();
      this.apply();
    });
    this.el.editor?.addEventListener("keydown", (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
        e.preventDefault();
        this.apply();
      }
    });
  }

  get isOpen() {
    return this.deviceId !== null;
  }

  open(deviceId) {
    if (this.deviceId === deviceId && !this.root.hidden) {
      this.refresh();
      return;
    }
    this.deviceId = deviceId;
    this.data = null;
    this.baseVersion = null;
    this.seq++;
    this.root.hidden = false;
    this.root.dataset.deviceId = deviceId;
    this.root.dataset.loaded = "false";
    delete this.root.dataset.deleted;
    this.el.title.textContent = deviceId;
    this.el.type.textContent = "";
    this.setStatus(null);
    for (const k of ["version", "desiredVersion", "reportedVersion", "presenceVersion", "lastSeen", "registered"]) {
      this.el[k].textContent = "…";
    }
    for (const k of ["metadata", "reported", "desired", "delta"]) this.el[k].replaceChildren(h("span", { class: "muted" }, "Loading…"));
    this.el.editor.value = "";
    this.clearResult();
    this.showError("");
    this.closeMetadata();
    this.el.flapping.hidden = true;
    this.history = this.emptyHistory();
    this.el.timeline.replaceChildren(h("span", { class: "muted small" }, "Loading…"));
    this.el.timelineSummary.textContent = "";
    this.el.history.replaceChildren();
    this.updateBase();
    this.refresh();
    this.loadHistory();
    this.commands.open(deviceId);
    this.el.title.focus();
  }

  close() {
    if (this.deviceId === null) return;
    this.deviceId = null;
    this.data = null;
    this.seq++;
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    clearTimeout(this.historyTimer);
    this.historyTimer = null;
    this.commands.open(null);
    this.root.hidden = true;
    const id = this.root.dataset.deviceId;
    delete this.root.dataset.deviceId;
    this.hooks.onClose?.(id);
  }

  /** A live event for the open device arrived: refresh soon (coalesced). */
  notify(event) {
    if (!this.isOpen || !event || event.device_id !== this.deviceId) return;
    if (event.type === "command") {
      this.commands.onEvent(event); // the shadow and its history do not move with commands
      return;
    }
    if (event.type === "snapshot") this.commands.reload(); // the feed was away: events may be missing
    if (event.type === "presence" && typeof event.status === "string") this.setStatus(event.status);
    if (event.type === "deleted") {
      this.root.dataset.deleted = "true";
      this.setStatus("deleted");
      this.showError("This device has been deleted.");
      return;
    }
    // at most one reload per 120 ms, never postponed by the next event: a device reporting
    // faster than that would otherwise keep the panel from ever reloading
    if (this.historyTimer === null) {
      this.historyTimer = setTimeout(() => {
        this.historyTimer = null;
        this.refreshHistory();
      }, HISTORY_REFRESH_MS);
    }
    if (this.refreshTimer !== null) return;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      this.refresh();
    }, 120);
  }

  async refresh() {
    if (!this.isOpen) return;
    if (this.loading) {
      this.pendingRefresh = true;
      return;
    }
    this.loading = true;
    const seq = this.seq;
    const id = this.deviceId;
    try {
      const res = await api("GET", `/api/devices/${encodeURIComponent(id)}`);
      if (seq !== this.seq) return;
      if (!res.ok) {
        if (res.status === 404) {
          this.root.dataset.deleted = "true";
          this.setStatus("deleted");
        }
        this.showError(res.message);
        return;
      }
      if (!isPlainObject(res.data)) {
        this.showError("Unexpected response from the server.");
        return;
      }
      this.showError("");
      delete this.root.dataset.deleted;
      this.data = res.data;
      if (this.baseVersion === null) this.baseVersion = this.versionOf(res.data);
      this.render();
      this.hooks.onData?.(res.data);
    } catch (err) {
      console.error("panel refresh failed", err);
    } finally {
      this.loading = false;
      if (this.pendingRefresh) {
        this.pendingRefresh = false;
        this.refresh();
      }
    }
  }

  /** The desired section's version: what an edit is based on. Older gateways lack it: 0. */
  versionOf(data) {
    if (!isPlainObject(data)) return null;
    const v = Number(data.desired_version ?? 0);
    return Number.isFinite(v) ? v : null;
  }

  /** With a read-only key every write control is disabled, and says why. */
  setReadOnly(readOnly, reason) {
    this.readOnly = Boolean(readOnly);
    this.root.dataset.readOnly = this.readOnly ? "true" : "false";
    for (const el of this.root.querySelectorAll("[data-write]")) {
      el.disabled = this.readOnly; // Apply also waits for a loaded device: updateBase below
      if (this.readOnly) el.title = reason;
      else el.removeAttribute("title");
    }
    if (this.el.readOnly) {
      this.el.readOnly.textContent = this.readOnly ? reason : "";
      this.el.readOnly.hidden = !this.readOnly;
    }
    this.commands.setReadOnly(this.readOnly, reason);
    this.updateBase();
  }

  canApply() {
    return !this.readOnly && !this.applying && this.baseVersion !== null;
  }

  setStatus(status) {
    const s = this.el.status;
    s.textContent = status || "…";
    s.dataset.status = status || "unknown";
    if (status) this.root.dataset.status = status;
  }

  render() {
    const d = this.data;
    if (!d) return;
    this.root.dataset.loaded = "true";
    this.root.dataset.version = String(d.version ?? "");
    this.root.dataset.desiredVersion = String(d.desired_version ?? 0);
    this.el.title.textContent = d.device_id ?? this.deviceId;
    this.el.type.textContent = d.device_type ?? "";
    if (d.transport) this.el.type.textContent += ` · ${d.transport}`; // websocket or mqtt, while online
    this.setStatus(typeof d.status === "string" ? d.status : null);
    this.el.version.textContent = String(d.version ?? "—");
    this.el.desiredVersion.textContent = String(d.desired_version ?? 0);
    this.el.reportedVersion.textContent = String(d.reported_version ?? 0);
    this.el.presenceVersion.textContent = String(d.presence_version ?? "—");
    this.el.registered.textContent = formatDateTime(toEpochMs(d.registered_at));
    this.tick();

    const leaves = collectDeltaLeaves(d.delta);
    const hl = new Set(leaves.map((l) => JSON.stringify(l.path)));
    this.el.metadata.replaceChildren(renderJson(d.metadata ?? {}, new Set()));
    this.el.reported.replaceChildren(renderJson(d.reported_state ?? {}, hl));
    this.el.desired.replaceChildren(renderJson(d.desired_state ?? {}, hl));
    this.renderDelta(leaves);
    this.updateBase();
    if (this.history.loaded) this.renderPast();
  }

  renderDelta(leaves) {
    const box = this.el.delta;
    box.dataset.count = String(leaves.length);
    box.dataset.inSync = leaves.length === 0 ? "true" : "false";
    if (leaves.length === 0) {
      box.replaceChildren(h("p", { class: "in-sync" }, "In sync: reported matches desired."));
      return;
    }
    const table = h("table", { class: "delta-table" },
      h("thead", null, h("tr", null, h("th", null, "path"), h("th", null, "desired"), h("th", null, "reported"))));
    const body = h("tbody");
    for (const leaf of leaves) {
      body.append(h("tr", { class: "delta-leaf", dataset: { path: leaf.path.join(".") } },
        h("td", { class: "delta-path" }, leaf.path.join(".") || "(root)"),
        h("td", { class: "delta-desired" }, inlineJson(leaf.desired)),
        h("td", { class: "delta-reported" }, inlineJson(leaf.reported))));
    }
    table.append(body);
    box.replaceChildren(table);
  }

  /** Ticks "last seen" once a second, and moves the timeline's "now" along now and then. */
  tick() {
    if (!this.data) return;
    const ms = toEpochMs(this.data.last_seen);
    this.el.lastSeen.textContent = ms ? `${formatAgo(ms)} (${formatDateTime(ms)})` : "never";
    if (this.history.loaded && Date.now() - this.timelineDrawnAt > 10000) this.renderPast();
  }

  // ---- history: timeline, plots and the list -------------------------------------------

  emptyHistory() {
    return { items: [], ids: new Set(), next: undefined, shown: HISTORY_SHOWN, loaded: false, loading: false };
  }

  /** One page of history, older than *before*; null when the request failed. */
  async fetchHistory(id, before, limit = HISTORY_FETCH) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (before) query.set("before", before);
    const res = await api("GET", `/api/devices/${encodeURIComponent(id)}/history?${query}`);
    if (!res.ok || !isPlainObject(res.data) || !Array.isArray(res.data.items)) {
      this.el.historyState.textContent = res.ok ? "" : `Could not load the history: ${res.message}`;
      return null;
    }
    return res.data;
  }

  /** The last 24 hours of history (or all that is kept, if less), then draw it. */
  async loadHistory() {
    const id = this.deviceId;
    const seq = this.seq;
    const history = this.emptyHistory();
    history.loading = true;
    this.history = history;
    let before = null;
    for (let page = 0; page < 2; page++) {
      const data = await this.fetchHistory(id, before);
      if (seq !== this.seq || this.history !== history) return;
      if (!data) break;
      this.mergeHistory(data.items, false);
      history.next = data.next_before ?? null;
      before = history.next;
      const oldest = history.items.length ? toEpochMs(history.items[history.items.length - 1].timestamp) : null;
      if (!before || (oldest !== null && oldest < Date.now() - DAY_MS)) break;
    }
    history.loading = false;
    history.loaded = true;
    this.renderPast();
  }

  /** Newer events for the open device: the newest page, merged (the live feed coalesces states). */
  async refreshHistory() {
    if (!this.isOpen || !this.history.loaded) return;
    const seq = this.seq;
    const data = await this.fetchHistory(this.deviceId, null, HISTORY_SHOWN);
    if (seq !== this.seq || !data) return;
    if (this.mergeHistory(data.items, true)) this.renderPast();
  }

  /** Adds items not yet known: at the front (newer) or the back (older). Returns how many. */
  mergeHistory(items, newer) {
    const fresh = items.filter((e) => isPlainObject(e) && typeof e.id === "string" && !this.history.ids.has(e.id));
    for (const e of fresh) this.history.ids.add(e.id);
    if (newer) this.history.items.unshift(...fresh);
    else this.history.items.push(...fresh);
    return fresh.length;
  }

  renderPast() {
    const history = this.history;
    const t1 = Date.now();
    // the last 24 hours, or less for a device registered since (its whole life then)
    const registeredAt = toEpochMs(this.data?.registered_at);
    const young = history.next === null && registeredAt !== null && registeredAt > t1 - DAY_MS;
    const t0 = young ? Math.min(registeredAt, t1 - MIN_SPAN_MS) : t1 - DAY_MS;
    this.timelineDrawnAt = t1;
    const result = presencePeriods(history.items, {
      t0, t1,
      status: this.data?.status ?? this.root.dataset.status,
      registeredAt,
      complete: history.next === null,
    });
    this.el.timelineTitle.textContent = young ? "Presence since registration" : "Presence, last 24 hours";
    renderTimeline(this.el.timeline, this.el.timelineSummary, result, t0, t1);
    this.el.flapping.hidden = !result.flapping;
    this.root.dataset.flapping = result.flapping ? "true" : "false";
    this.plots.render(history.items, t0, t1);
    this.renderHistoryList();
  }

  renderHistoryList() {
    const { items, shown, next } = this.history;
    const list = this.el.history;
    list.replaceChildren(...items.slice(0, shown).map((e) => historyEntry(e)));
    list.dataset.count = String(Math.min(shown, items.length));
    this.el.historyOlder.hidden = !(items.length > shown || next);
    this.el.historyState.textContent = items.length === 0 ? "No history yet." :
      items.length <= shown && next === null ? "Nothing older is kept." : "";
  }

  async showOlder() {
    const history = this.history;
    if (history.loading) return;
    history.shown += HISTORY_SHOWN;
    if (history.items.length < history.shown && history.next) {
      history.loading = true;
      const seq = this.seq;
      const data = await this.fetchHistory(this.deviceId, history.next);
      history.loading = false;
      if (seq !== this.seq || this.history !== history) return;
      if (data) {
        this.mergeHistory(data.items, false);
        history.next = data.next_before ?? null;
      }
    }
    this.renderHistoryList();
  }

  // ---- metadata ------------------------------------------------------------------------

  editMetadata() {
    if (!this.data || this.readOnly) return;
    this.el.metadataEditor.value = JSON.stringify(this.data.metadata ?? {}, null, 2);
    this.el.metadataResult.hidden = true;
    this.el.metadataForm.hidden = false;
    this.el.metadataEdit.hidden = true;
    this.el.metadataEditor.focus();
  }

  closeMetadata() {
    this.el.metadataForm.hidden = true;
    this.el.metadataEdit.hidden = false;
  }

  async saveMetadata() {
    if (!this.isOpen || this.readOnly || !this.data) return;
    const result = this.el.metadataResult;
    const say = (kind, text) => {
      result.hidden = false;
      result.dataset.status = kind;
      result.textContent = text;
    };
    let edited;
    try {
      edited = JSON.parse(this.el.metadataEditor.value);
    } catch (err) {
      say("invalid", `Invalid JSON, not saved: ${err.message}`);
      return;
    }
    if (!isPlainObject(edited)) {
      say("invalid", "Metadata must be a JSON object. Not saved.");
      return;
    }
    const patch = mergePatch(this.data.metadata ?? {}, edited);
    const id = this.deviceId;
    const seq = this.seq;
    const res = await api("PATCH", `/api/devices/${encodeURIComponent(id)}`, { metadata: patch });
    if (seq !== this.seq) return;
    if (!res.ok) {
      say("error", res.message);
      return;
    }
    if (isPlainObject(res.data)) {
      this.data = res.data;
      this.render();
    }
    this.closeMetadata();
    this.el.metadataEdit.focus();
  }

  updateBase() {
    const base = this.baseVersion;
    const current = this.versionOf(this.data);
    this.el.baseVersion.textContent = base === null ? "—" : String(base);
    this.el.apply.disabled = !this.canApply();
    const stale = !this.readOnly && base !== null && current !== null && current !== base;
    this.el.stale.hidden = !stale;
    if (stale) {
      this.el.stale.replaceChildren(
        `The desired state changed since you started editing (desired version ${base} → ${current}). Applying will report a conflict. `,
        h("button", { type: "button", class: "link", onclick: () => this.reloadLatest() }, "Use latest version"));
    }
  }

  clearResult() {
    const r = this.el.result;
    r.replaceChildren();
    r.hidden = true;
    r.dataset.conflict = "false";
    r.dataset.status = "";
  }

  showResult(kind, ...children) {
    const r = this.el.result;
    r.hidden = false;
    r.dataset.status = kind;
    r.dataset.conflict = kind === "conflict" ? "true" : "false";
    r.replaceChildren(...children);
  }

  showError(msg) {
    this.el.error.textContent = msg;
    this.el.error.hidden = !msg;
  }

  /** Validates the editor's text: returns the patch object, or null after showing why. */
  readPatch() {
    const text = this.el.editor.value.trim();
    if (!text) {
      this.showResult("invalid", 'Enter a JSON object to merge into the desired state, e.g. {"led": {"color": "red"}}.');
      return null;
    }
    let patch;
    try {
      patch = JSON.parse(text);
    } catch (err) {
      this.showResult("invalid", `Invalid JSON, not sent: ${err.message}`);
      return null;
    }
    if (!isPlainObject(patch)) {
      this.showResult("invalid", "The patch must be a JSON object (a value of null deletes a key). Not sent.");
      return null;
    }
    return patch;
  }

  async apply() {
    if (!this.isOpen || this.applying || this.readOnly) return;
    const patch = this.readPatch();
    if (!patch) return;
    if (this.baseVersion === null) {
      this.showResult("invalid", "The device has not loaded yet; try again in a moment.");
      return;
    }
    const id = this.deviceId;
    const seq = this.seq;
    const base = this.baseVersion;
    this.applying = true;
    this.updateBase();
    this.showResult("pending", "Applying…");
    try {
      const request = { state: patch, desired_version: base };
      const res = await api("PATCH", `/api/devices/${encodeURIComponent(id)}/desired`, request);
      if (seq !== this.seq) return;
      if (res.ok) {
        const body = isPlainObject(res.data) ? res.data : {};
        const v = this.versionOf(body);
        this.baseVersion = v ?? base + 1;
        if (this.data) {
          if (isPlainObject(body.desired_state)) this.data.desired_state = body.desired_state;
          if (body.delta !== undefined) this.data.delta = body.delta;
          for (const k of ["version", "desired_version", "reported_version"]) {
            if (Number.isFinite(Number(body[k]))) this.data[k] = Number(body[k]);
          }
          this.render();
        }
        this.showResult("ok", `Applied. The desired state is now at desired version ${this.baseVersion}.`);
        return;
      }
      if (res.status === 409) {
        // one sentence, from the versions the problem carries (its detail says the same)
        const current = res.problem?.current_desired_version;
        const moved = Number.isFinite(Number(current)) ? ` (desired version ${base} → ${current})` : "";
        this.showResult("conflict",
          h("strong", null, "Conflict: "),
          `someone else changed the desired state since you loaded it${moved}. Nothing was applied. `,
          h("span", { class: "actions" },
            h("button", { type: "button", id: "desired-reload", onclick: () => this.reloadLatest() }, "Reload latest"),
            " ",
            h("button", { type: "button", id: "desired-reapply", class: "primary", dataset: { write: "" }, onclick: () => this.reloadLatest(true) }, "Reload latest & re-apply")));
        this.refresh();
        return;
      }
      this.showResult("error", res.message);
    } finally {
      this.applying = false;
      this.updateBase();
    }
  }

  /** Loads the current shadow and bases the editor on it; optionally re-applies the same patch. */
  async reloadLatest(reapply = false) {
    if (!this.isOpen) return;
    this.baseVersion = null;
    this.updateBase();
    this.showResult("pending", "Reloading the latest shadow…");
    // Wait for any in-flight load, then load fresh.
    while (this.loading) await new Promise((r) => setTimeout(r, 30));
    await this.refresh();
    if (this.baseVersion === null) {
      this.showResult("error", "Could not reload the device.");
      return;
    }
    if (reapply) await this.apply();
    else this.showResult("info", `Reloaded desired version ${this.baseVersion}. Review the desired state above, then apply again.`);
  }
}

// ---- history entries and merge patches -------------------------------------------------------

function historyEntry(e) {
  const ts = toEpochMs(e.timestamp);
  const time = h("time", { class: "log-time", title: ts ? new Date(ts).toISOString() : "" }, ts ? formatClock(ts) : "—");
  if (e.type === "presence") {
    const status = e.status === "online" ? "online" : "offline";
    return h("li", { class: "history-entry", dataset: { eventId: e.id, kind: "presence", status } },
      time, h("span", { class: "dot", "aria-hidden": "true" }), h("span", { class: "log-status" }, status),
      e.reason ? h("span", { class: "log-reason" }, e.reason) : null);
  }
  const what = e.type === "state" ? `${e.section} v${e.version}` : String(e.type);
  const body = e.type === "state" ? e.state : e.type === "metadata" ? e.metadata : undefined;
  let text = "";
  try {
    text = body === undefined ? "" : JSON.stringify(body);
  } catch {
    text = "";
  }
  return h("li", { class: "history-entry", dataset: { eventId: e.id, kind: String(e.type) } },
    time, h("span", { class: "history-kind" }, what),
    h("code", { class: "history-body", title: text }, text.length > 160 ? `${text.slice(0, 160)}…` : text));
}

/** The merge patch that turns *before* into *after* (RFC 7386): removed keys become null. */
export function mergePatch(before, after) {
  const patch = {};
  for (const key of Object.keys(before)) if (!(key in after)) patch[key] = null;
  for (const [key, value] of Object.entries(after)) {
    const old = before[key];
    if (isPlainObject(old) && isPlainObject(value)) {
      const inner = mergePatch(old, value);
      if (Object.keys(inner).length) patch[key] = inner;
    } else if (JSON.stringify(old) !== JSON.stringify(value)) {
      patch[key] = value;
    }
  }
  return patch;
}

// ---- delta and JSON rendering ---------------------------------------------------------------

function isDeltaLeaf(v) {
  if (!isPlainObject(v)) return false;
  const keys = Object.keys(v);
  return keys.length > 0 && keys.length <= 2 && keys.every((k) => k === "desired" || k === "reported");
}

/** Flattens the nested delta into [{path, desired, reported}]. */
export function collectDeltaLeaves(delta) {
  const out = [];
  const walk = (node, path) => {
    if (isDeltaLeaf(node)) {
      out.push({ path, desired: node.desired, reported: node.reported });
    } else if (isPlainObject(node)) {
      for (const [k, v] of Object.entries(node)) walk(v, [...path, k]);
    } else if (node !== undefined && node !== null && path.length) {
      out.push({ path, desired: node, reported: undefined });
    }
  };
  if (isPlainObject(delta)) walk(delta, []);
  return out;
}

function inlineJson(v) {
  if (v === undefined) return h("span", { class: "j-missing" }, "(absent)");
  let text;
  try {
    text = JSON.stringify(v);
  } catch {
    text = String(v);
  }
  return h("code", { class: jsonClass(v) }, text);
}

function jsonClass(v) {
  if (v === null) return "j-null";
  if (typeof v === "string") return "j-str";
  if (typeof v === "number") return "j-num";
  if (typeof v === "boolean") return "j-bool";
  return "j-obj";
}

/** Pretty JSON as DOM lines; lines for paths in `hl` (JSON-encoded path arrays) and their subtrees get .hl. */
export function renderJson(value, hl) {
  const frag = document.createDocumentFragment();
  const line = (mark, ...parts) => {
    const el = h("span", { class: mark ? "jl hl" : "jl" }, ...parts);
    frag.append(el, "\n");
  };
  const emit = (v, path, indent, label, comma, inherited) => {
    const mark = inherited || (path.length > 0 && hl.has(JSON.stringify(path)));
    const pad = "  ".repeat(indent);
    const pre = label === null ? [pad] : [pad, h("span", { class: "j-key" }, JSON.stringify(label)), ": "];
    const tail = comma ? "," : "";
    if (isPlainObject(v) && Object.keys(v).length) {
      const entries = Object.entries(v);
      line(mark, ...pre, "{");
      entries.forEach(([k, child], i) => emit(child, [...path, k], indent + 1, k, i < entries.length - 1, mark));
      line(mark, pad, "}" + tail);
    } else if (Array.isArray(v) && v.length) {
      line(mark, ...pre, "[");
      v.forEach((child, i) => emit(child, [...path, String(i)], indent + 1, null, i < v.length - 1, mark));
      line(mark, pad, "]" + tail);
    } else {
      let text;
      if (isPlainObject(v)) text = "{}";
      else if (Array.isArray(v)) text = "[]";
      else text = JSON.stringify(v) ?? "null";
      line(mark, ...pre, h("span", { class: jsonClass(v) }, text), tail);
    }
  };
  emit(value, [], 0, null, false, false);
  return frag;
}
