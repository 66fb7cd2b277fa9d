// The device panel's commands: a form that sends one (admin keys), and the device's commands,
// newest first, paged with the server's cursor. Rows follow the fleet's `command` events live:
// an event moves the row's status at once, and the command is read again (coalesced) for what
// events do not carry: result, error and times. A final status never changes again, so a late
// read never takes a finished row back.

import { api } from "./api.js";
import { formatClock, formatDateTime, h, isPlainObject, toEpochMs } from "./util.js";

const PAGE = 20; // commands per page of the list
const MAX_ROWS = 500; // live rows kept at most; older ones are reached again by reloading
const REFETCH_MS = 80; // events of one command that come together cause one read
const NAME_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
const FINAL = new Set(["succeeded", "failed", "timed_out", "expired", "canceled"]);
const STATUS_TEXT = {
  queued: "queued",
  sent: "sent",
  succeeded: "succeeded",
  failed: "failed",
  timed_out: "timed out",
  expired: "expired",
  canceled: "canceled",
};
const SHOWN_JSON = 600; // characters of a result shown in a row (all of it in its tooltip)

const $ = (id) => document.getElementById(id);

/** The problem's kind from its `type` URL: ".../problems/device-offline" → "device-offline". */
function problemKind(problem) {
  const type = isPlainObject(problem) && typeof problem.type === "string" ? problem.type : "";
  return type.slice(type.lastIndexOf("/") + 1);
}

function jsonText(value) {
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

export class CommandsView {
  constructor() {
    this.el = {
      section: $("panel-commands"),
      form: $("command-form"),
      name: $("command-name"),
      params: $("command-params"),
      timeout: $("command-timeout"),
      ttl: $("command-ttl"),
      send: $("command-send"),
      result: $("command-result"),
      readOnly: $("command-read-only"),
      list: $("command-list"),
      older: $("command-older"),
      state: $("command-state"),
    };
    this.deviceId = null;
    this.seq = 0; // guards against late answers for a device no longer shown
    this.pageSeq = 0; // guards a page load against a newer reload of the same device
    this.readOnly = false;
    this.reason = "";
    this.sending = false;
    this.rows = new Map(); // command id -> {cmd, li}
    this.next = undefined; // cursor of the next older page; null: none; undefined: not loaded
    this.loading = false;
    this.refetch = new Set();
    this.refetchTimer = null;
    this.watching = null; // the command this page sent last: its outcome is announced

    this.el.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    this.el.params.addEventListener("keydown", (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
        e.preventDefault();
        this.send();
      }
    });
    for (const field of this.fields()) field.addEventListener("input", () => this.markInvalid(field, false));
    this.el.older.addEventListener("click", () => this.loadOlder());
  }

  fields() {
    return [this.el.name, this.el.params, this.el.timeout, this.el.ttl];
  }

  /** The panel opened *deviceId* (or closed: null): start over with its commands. */
  open(deviceId) {
    this.deviceId = deviceId;
    this.seq++;
    this.rows.clear();
    this.next = undefined;
    this.loading = false;
    this.watching = null;
    this.refetch.clear();
    clearTimeout(this.refetchTimer);
    this.refetchTimer = null;
    this.el.list.replaceChildren();
    this.el.list.dataset.count = "0";
    delete this.el.list.dataset.loaded;
    this.el.older.hidden = true;
    this.el.state.textContent = "";
    this.clearResult();
    for (const field of this.fields()) this.markInvalid(field, false);
    this.updateSend();
    if (deviceId !== null) this.reload();
  }

  /** With a read-only key the form is disabled (the panel disables its [data-write] controls)
   * and says why beside it. */
  setReadOnly(readOnly, reason) {
    this.readOnly = Boolean(readOnly);
    this.reason = this.readOnly ? String(reason) : "";
    this.el.readOnly.textContent = this.readOnly ? `Sending commands is disabled (${reason}).` : "";
    this.el.readOnly.hidden = !this.readOnly;
    this.el.section.dataset.readOnly = this.readOnly ? "true" : "false";
    if (this.readOnly) this.el.form.setAttribute("aria-describedby", "command-read-only");
    else this.el.form.removeAttribute("aria-describedby");
    for (const { li } of this.rows.values()) this.paintCancel(li);
    this.updateSend();
  }

  updateSend() {
    this.el.send.disabled = this.readOnly || this.sending || this.deviceId === null;
  }

  // ---- the list ------------------------------------------------------------------------

  /** The newest page again: on open, and after the live feed reconnected (events may be
   * missing from the time it was away). */
  async reload() {
    if (this.deviceId === null) return;
    const seq = this.seq;
    const generation = ++this.pageSeq;
    this.loading = true;
    const page = await this.fetchPage(null);
    if (seq !== this.seq || generation !== this.pageSeq) return;
    this.loading = false;
    if (!page) return;
    const fresh = new Set(page.items.map((c) => c.command_id));
    for (const [id, { li }] of this.rows) {
      if (!fresh.has(id)) {
        li.remove();
        this.rows.delete(id);
      }
    }
    for (const cmd of page.items) this.upsert(cmd);
    this.next = page.next;
    this.el.list.dataset.loaded = "true";
    this.updateFoot();
  }

  async loadOlder() {
    if (this.loading || !this.next) return;
    const seq = this.seq;
    const generation = this.pageSeq;
    this.loading = true;
    this.el.state.textContent = "Loading older commands…";
    const page = await this.fetchPage(this.next);
    if (seq !== this.seq || generation !== this.pageSeq) return;
    this.loading = false;
    if (page) {
      for (const cmd of page.items) this.upsert(cmd);
      this.next = page.next;
    }
    this.updateFoot();
  }

  async fetchPage(cursor) {
    const query = new URLSearchParams({ status: "all", limit: String(PAGE) });
    if (cursor) query.set("cursor", cursor);
    const res = await api("GET", `/api/devices/${encodeURIComponent(this.deviceId)}/commands?${query}`);
    if (!res.ok || !isPlainObject(res.data) || !Array.isArray(res.data.items)) {
      this.el.state.textContent = res.ok ? "Unexpected response from the server." : `Could not load the commands: ${res.message}`;
      return null;
    }
    const items = res.data.items.filter((c) => isPlainObject(c) && typeof c.command_id === "string");
    return { items, next: typeof res.data.next_cursor === "string" && res.data.next_cursor ? res.data.next_cursor : null };
  }

  updateFoot() {
    const count = this.rows.size;
    this.el.list.dataset.count = String(count);
    this.el.older.hidden = !this.next;
    if (this.loading) return;
    if (count === 0) this.el.state.textContent = this.next === null ? "No commands yet." : "";
    else if (this.next === null) this.el.state.textContent = "No older commands are kept.";
    else this.el.state.textContent = "";
  }

  /** A command record (from a page, a read or the POST's answer): its row, made or updated. */
  upsert(cmd, live = false) {
    const known = this.rows.get(cmd.command_id);
    if (known) {
      // a final row stays final: a read that started before the last event may answer late
      if (FINAL.has(known.cmd.status) && !FINAL.has(cmd.status)) return;
      known.cmd = { ...known.cmd, ...cmd };
      this.paint(known.li, known.cmd);
      return;
    }
    const created = Number(cmd.created_at) || 0;
    // a live change of a command older than the loaded pages waits for "Load older": the
    // list stays a run of pages, without gaps
    if (live && this.next) {
      const oldest = this.rows.get(this.el.list.lastElementChild?.dataset.commandId)?.cmd;
      if (oldest && created < (Number(oldest.created_at) || 0)) return;
    }
    const li = h("li", { class: "command", tabindex: "-1", dataset: { commandId: cmd.command_id } });
    const entry = { cmd, li };
    this.rows.set(cmd.command_id, entry);
    this.paint(li, cmd);
    // newest first: by creation time, then id (generated ids sort by time)
    let before = null;
    for (const other of this.el.list.children) {
      const o = this.rows.get(other.dataset.commandId)?.cmd;
      const oc = Number(o?.created_at) || 0;
      if (oc < created || (oc === created && String(o?.command_id) < cmd.command_id)) {
        before = other;
        break;
      }
    }
    this.el.list.insertBefore(li, before);
    while (this.rows.size > MAX_ROWS) {
      const last = this.el.list.lastElementChild;
      if (!last) break;
      this.rows.delete(last.dataset.commandId);
      last.remove();
      if (this.next === null) this.next = undefined; // older ones exist again, reached by reloading
    }
    this.updateFoot();
  }

  /** Draw a row; *complete* when *cmd* is a record read from the gateway (an event's update
   * lacks the result and times). */
  paint(li, cmd, complete = true) {
    const status = typeof cmd.status === "string" ? cmd.status : "unknown";
    li.dataset.status = status;
    li.dataset.final = FINAL.has(status) ? "true" : "false";
    li.dataset.attempts = String(cmd.attempts ?? 0);
    const created = toEpochMs(cmd.created_at);
    const sent = toEpochMs(cmd.sent_at);
    const done = toEpochMs(cmd.completed_at);
    const due = toEpochMs(cmd.deadline);
    const times = [h("time", { class: "command-created", title: formatDateTime(created) }, `created ${formatClock(created)}`)];
    if (sent) times.push(h("time", { class: "command-sent", title: formatDateTime(sent) }, `sent ${formatClock(sent)}`));
    if (status === "sent" && due) times.push(h("time", { class: "command-due", title: formatDateTime(due) }, `due ${formatClock(due)}`));
    if (done) {
      const took = sent && done >= sent ? ` (${((done - sent) / 1000).toFixed(done - sent < 10000 ? 2 : 0)} s)` : "";
      times.push(h("time", { class: "command-done", title: formatDateTime(done) }, `done ${formatClock(done)}${took}`));
    }
    const attempts = Number(cmd.attempts) || 0;
    const head = h("div", { class: "command-head" },
      h("span", { class: "command-name" }, String(cmd.name ?? "?")),
      h("span", { class: "badge command-status", dataset: { status } }, STATUS_TEXT[status] ?? status),
      attempts > 1 ? h("span", { class: "command-attempts muted small" }, `attempt ${attempts}`) : null,
      h("span", { class: "spacer" }),
      this.cancelButton(cmd));
    const meta = h("div", { class: "command-times muted small" }, ...times.flatMap((t, i) => (i ? [" · ", t] : [t])),
      h("span", { class: "command-id", title: "command id" }, ` · ${cmd.command_id}`));
    const parts = [head, meta];
    if (isPlainObject(cmd.params) && Object.keys(cmd.params).length) {
      parts.push(h("div", { class: "command-line small" }, h("span", { class: "muted" }, "params "), h("code", { class: "command-params" }, clip(jsonText(cmd.params)))));
    }
    if (cmd.result !== null && cmd.result !== undefined) {
      const text = jsonText(cmd.result);
      parts.push(h("div", { class: "command-line small" }, h("span", { class: "muted" }, "result "),
        h("code", { class: "command-result", title: text.length > SHOWN_JSON ? text : null }, clip(text))));
    }
    if (typeof cmd.error === "string" && cmd.error) {
      parts.push(h("div", { class: "command-line command-error small" }, h("span", null, "error: "), cmd.error));
    }
    const focused = li.contains(document.activeElement);
    li.replaceChildren(...parts);
    if (focused) li.focus(); // its Cancel went away: focus stays on the row, not the page
    li.setAttribute("aria-label", `${cmd.name ?? "command"}: ${STATUS_TEXT[status] ?? status}`);
    this.announce(cmd, complete);
  }

  cancelButton(cmd) {
    if (FINAL.has(cmd.status)) return null;
    const button = h("button", {
      type: "button", class: "link command-cancel", "data-write": "",
      "aria-label": `Cancel ${cmd.name ?? "command"} ${cmd.command_id}`,
      onclick: () => this.cancel(cmd.command_id),
    }, "Cancel");
    this.paintCancel(null, button);
    return button;
  }

  paintCancel(li, button = li?.querySelector(".command-cancel")) {
    if (!button) return;
    button.disabled = this.readOnly;
    if (this.readOnly) button.title = this.reason;
    else button.removeAttribute("title");
  }

  async cancel(commandId) {
    if (this.readOnly) return;
    const seq = this.seq;
    const res = await api("DELETE", `/api/devices/${encodeURIComponent(this.deviceId)}/commands/${encodeURIComponent(commandId)}`);
    if (seq !== this.seq) return;
    if (res.ok && isPlainObject(res.data)) this.upsert(res.data);
    else if (res.status === 409) this.queueRead(commandId); // it finished meanwhile: show how
    else this.el.state.textContent = `Could not cancel: ${res.message}`;
  }

  // ---- live ------------------------------------------------------------------------------

  /** A `command` event of the fleet feed. */
  onEvent(ev) {
    if (this.deviceId === null || ev.device_id !== this.deviceId || typeof ev.command_id !== "string") return;
    const known = this.rows.get(ev.command_id);
    if (known && typeof ev.status === "string" && !(FINAL.has(known.cmd.status) && !FINAL.has(ev.status))) {
      const update = { status: ev.status };
      if (Number.isFinite(Number(ev.attempt))) update.attempts = Math.max(Number(ev.attempt), Number(known.cmd.attempts) || 0);
      if (typeof ev.error === "string") update.error = ev.error;
      known.cmd = { ...known.cmd, ...update };
      this.paint(known.li, known.cmd, false);
    }
    // the record has what the event does not (result, times), and a row for a command made
    // elsewhere
    this.queueRead(ev.command_id);
  }

  queueRead(commandId) {
    this.refetch.add(commandId);
    if (this.refetchTimer !== null) return;
    this.refetchTimer = setTimeout(() => this.readQueued(), REFETCH_MS);
  }

  async readQueued() {
    this.refetchTimer = null;
    const ids = [...this.refetch];
    this.refetch.clear();
    if (this.deviceId === null) return;
    const seq = this.seq;
    const device = encodeURIComponent(this.deviceId);
    await Promise.all(ids.map(async (id) => {
      const res = await api("GET", `/api/devices/${device}/commands/${encodeURIComponent(id)}`);
      if (seq !== this.seq || !res.ok || !isPlainObject(res.data)) return;
      this.upsert(res.data, true);
    }));
  }

  // ---- the form --------------------------------------------------------------------------

  markInvalid(field, invalid) {
    if (invalid) {
      field.setAttribute("aria-invalid", "true");
      field.setAttribute("aria-errormessage", "command-result");
    } else {
      field.removeAttribute("aria-invalid");
      field.removeAttribute("aria-errormessage");
    }
  }

  clearResult() {
    const r = this.el.result;
    r.hidden = true;
    r.textContent = "";
    r.dataset.status = "";
    r.dataset.kind = "";
  }

  say(kind, text, problem = "") {
    const r = this.el.result;
    r.hidden = false;
    r.dataset.status = kind;
    r.dataset.kind = problem;
    r.textContent = text;
  }

  /** Refuse in the page, before anything is sent: which field, and why. */
  refuse(field, text) {
    for (const f of this.fields()) this.markInvalid(f, f === field);
    this.say("invalid", `Not sent: ${text}`, "input");
    field.focus();
    return null;
  }

  /** The request body from the form, or null after saying what is wrong. */
  readForm() {
    const name = this.el.name.value.trim();
    if (!NAME_PATTERN.test(name)) {
      return this.refuse(this.el.name, "the name must be 1–64 characters of A–Z, a–z, 0–9, _ . -");
    }
    const body = { name };
    const raw = this.el.params.value.trim();
    if (raw) {
      let params;
      try {
        params = JSON.parse(raw);
      } catch (err) {
        return this.refuse(this.el.params, `params are not valid JSON: ${err.message}`);
      }
      if (!isPlainObject(params)) return this.refuse(this.el.params, 'params must be a JSON object, e.g. {"delay": 5}.');
      body.params = params;
    }
    for (const [key, field, low, high, unit] of [
      ["timeout", this.el.timeout, 0.1, 3600, "0.1–3600 seconds"],
      ["ttl", this.el.ttl, 0, 604800, "0–604800 seconds (7 days)"],
    ]) {
      if (field.validity?.badInput) return this.refuse(field, `${key} must be a number of seconds (${unit}).`);
      const text = field.value.trim();
      if (!text) continue; // the gateway's default
      const value = Number(text);
      if (!Number.isFinite(value) || value < low || value > high) return this.refuse(field, `${key} must be ${unit}.`);
      body[key] = value;
    }
    for (const f of this.fields()) this.markInvalid(f, false);
    return body;
  }

  async send() {
    if (this.deviceId === null || this.readOnly || this.sending) return;
    const body = this.readForm();
    if (!body) return;
    const seq = this.seq;
    const id = this.deviceId;
    this.sending = true;
    this.updateSend();
    this.say("pending", `Sending ${body.name}…`);
    try {
      const res = await api("POST", `/api/devices/${encodeURIComponent(id)}/commands`, body);
      if (seq !== this.seq) return;
      if (res.ok && isPlainObject(res.data)) {
        const commandId = res.data.command_id;
        this.watching = commandId;
        this.upsert(res.data);
        // live events may have shown it (even finished) before this answer came
        const shown = this.rows.get(commandId)?.cmd ?? res.data;
        if (FINAL.has(shown.status)) this.announce(shown);
        else {
          const where = shown.status === "queued" ? "queued: the device is offline; it gets it when it connects" : shown.status;
          this.say("ok", `Sent ${body.name}: ${where}.`);
        }
        return;
      }
      this.showRefusal(res);
    } finally {
      this.sending = false;
      this.updateSend();
    }
  }

  /** The gateway refused: say why in one sentence, and point at the field when it names one. */
  showRefusal(res) {
    const kind = problemKind(res.problem);
    const detail = isPlainObject(res.problem) && typeof res.problem.detail === "string" ? res.problem.detail : res.message;
    let text = `Not sent: ${res.message}`;
    let field = null;
    if (kind === "device-offline") {
      text = "Not sent: the device is not connected, and a ttl of 0 delivers only to a connected device. Give a ttl to queue it until it connects.";
      field = this.el.ttl;
    } else if (kind === "command-queue-full") {
      const pending = Number(res.problem?.pending);
      const count = Number.isFinite(pending) ? ` (${pending} pending)` : "";
      text = `Not sent: the device's command queue is full${count}. Wait for some to finish, or cancel some, and send again.`;
    } else if (kind === "command-exists") {
      text = `Not sent: ${detail}`;
    } else if (res.status === 422 || res.status === 413) {
      const parameter = typeof res.problem?.parameter === "string" ? res.problem.parameter : "";
      field = { name: this.el.name, params: this.el.params, timeout: this.el.timeout, ttl: this.el.ttl }[parameter.split(/[.[]/)[0]] ?? null;
      if (!field && (res.status === 413 || kind.startsWith("state-") || kind.startsWith("invalid-state"))) field = this.el.params;
      text = `Not sent: ${detail}`;
    } else if (res.status === 404 && kind === "device-not-found") {
      text = "Not sent: this device is no longer registered.";
    }
    for (const f of this.fields()) this.markInvalid(f, f === field);
    this.say("error", text, kind || String(res.status));
    if (field) field.focus();
  }

  /** The outcome of the command this page sent last, in the form's live region: said when
   * its final status arrives, completed with the result when its record is read. */
  announce(cmd, complete = true) {
    if (cmd.command_id !== this.watching || !FINAL.has(cmd.status)) return;
    if (complete) this.watching = null;
    const status = STATUS_TEXT[cmd.status] ?? cmd.status;
    const detail = cmd.status === "succeeded" && cmd.result !== null && cmd.result !== undefined ? `: ${clip(jsonText(cmd.result), 160)}`
      : typeof cmd.error === "string" && cmd.error ? `: ${cmd.error}` : "";
    this.say(cmd.status === "succeeded" ? "ok" : "error", `${cmd.name} ${status}${detail}`, cmd.status);
  }
}

function clip(text, max = SHOWN_JSON) {
  return text.length > max ? `${text.slice(0, max)}…` : text;
}
