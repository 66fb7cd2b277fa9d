// The per-device panel: metadata, reported, desired, delta (highlighted) and the desired-state editor.
// The editor's precondition is the desired section's own version (`desired_version`): the device's
// reports move the shadow version every few seconds, but never the desired section, so an edit
// conflicts only when someone else changed the desired state.

import { api } from "./api.js";
import { formatAgo, formatDateTime, h, isPlainObject, problemText, toEpochMs } from "./util.js";

const $ = (id) => document.getElementById(id);

export class DevicePanel {
  /** @param {{onClose?:()=>void, onData?:(data:object)=>void}} hooks */
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
    };
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
    $("panel-refresh")?.addEventListener("click", () => this.refresh());
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
    this.updateBase();
    this.refresh();
  }

  close() {
    if (this.deviceId === null) return;
    this.deviceId = null;
    this.data = null;
    this.seq++;
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    this.root.hidden = true;
    delete this.root.dataset.deviceId;
    this.hooks.onClose?.();
  }

  /** A live event for the open device arrived: refresh soon (coalesced). */
  notify(event) {
    if (!this.isOpen || !event || event.device_id !== this.deviceId) return;
    if (event.type === "presence" && typeof event.status === "string") this.setStatus(event.status);
    if (event.type === "deleted") {
      this.root.dataset.deleted = "true";
      this.setStatus("deleted");
      this.showError("This device has been deleted.");
      return;
    }
    // at most one reload per 120 ms, never postponed by the next event: a device reporting
    // faster than that would otherwise keep the panel from ever reloading
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

  /** Ticks "last seen" once a second. */
  tick() {
    if (!this.data) return;
    const ms = toEpochMs(this.data.last_seen);
    this.el.lastSeen.textContent = ms ? `${formatAgo(ms)} (${formatDateTime(ms)})` : "never";
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
