// The presence log: the latest events from the server on load (read back from the snapshot's
// cursor), live events after it, older pages on scroll. Ordered newest first, each event once.

import { api } from "./api.js";
import { cmpStreamId, formatClock, h, isPlainObject, parseStreamId, toEpochMs } from "./util.js";

const PAGE = 100;
const NEAR_END_PX = 48;

export class PresenceLog {
  /** @param {{list: HTMLOListElement, older: HTMLButtonElement, status: HTMLElement, cap: number, onOpen: (id:string)=>void}} opts */
  constructor({ list, older, status, cap, onOpen }) {
    this.list = list;
    this.olderButton = older;
    this.status = status;
    this.cap = cap;
    this.onOpen = onOpen;
    this.entries = []; // newest first, as in the DOM
    this.ids = new Set();
    this.pending = [];
    this.next = undefined; // where older events continue (opaque); null: none left; undefined: not loaded
    this.loadingOlder = false;
    this.localSeq = 0;
    older.addEventListener("click", () => this.loadOlder());
    list.addEventListener("scroll", () => {
      if (list.scrollTop + list.clientHeight >= list.scrollHeight - NEAR_END_PX) this.loadOlder();
    }, { passive: true });
  }

  /** Queue one presence event (live, replayed, or read back); duplicates are dropped. */
  add(ev) {
    if (!isPlainObject(ev) || ev.type !== "presence") return;
    const id = parseStreamId(ev.id) ? ev.id : `local-${++this.localSeq}`;
    if (this.ids.has(id)) return;
    this.ids.add(id);
    this.pending.push({
      id,
      device_id: typeof ev.device_id === "string" ? ev.device_id : "?",
      status: ev.status === "online" ? "online" : "offline",
      reason: typeof ev.reason === "string" ? ev.reason : "",
      ts: toEpochMs(ev.timestamp),
    });
  }

  /** Put the queued events in place (once per animation frame). */
  flush() {
    if (!this.pending.length) return;
    for (const e of this.pending) {
      const i = this.position(e.id);
      if (i >= this.cap) {
        this.ids.delete(e.id); // older than everything kept
        continue;
      }
      this.entries.splice(i, 0, e);
      this.list.insertBefore(this.render(e), this.list.children[i] || null);
      while (this.entries.length > this.cap) {
        this.ids.delete(this.entries.pop().id);
        this.list.lastElementChild?.remove();
      }
    }
    this.pending = [];
    this.updateFoot();
  }

  /** Where an entry with *id* goes: after every newer one (binary search, newest first). */
  position(id) {
    if (!parseStreamId(id)) return 0;
    let lo = 0;
    let hi = this.entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (cmpStreamId(this.entries[mid].id, id) > 0) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  render(e) {
    return h("li", { class: "log-entry", dataset: { eventId: e.id, deviceId: e.device_id, status: e.status } },
      h("time", { class: "log-time", title: e.ts ? new Date(e.ts).toISOString() : "" }, formatClock(e.ts)),
      h("span", { class: "dot", "aria-hidden": "true" }),
      h("button", { type: "button", class: "link log-device", onclick: () => this.onOpen(e.device_id) }, e.device_id),
      h("span", { class: "log-status" }, e.status),
      e.reason ? h("span", { class: "log-reason" }, e.reason) : null);
  }

  /** The events a snapshot reflects, newest first: read back from its cursor. */
  async loadLatest(upto) {
    const first = this.next === undefined;
    const page = await this.fetch(upto);
    if (!page) return;
    if (first) this.next = page.next;
    this.list.dataset.loaded = "true";
    this.updateFoot();
  }

  async loadOlder() {
    if (this.loadingOlder || !this.next || this.entries.length + this.pending.length >= this.cap) return;
    this.loadingOlder = true;
    this.status.textContent = "Loading older events…";
    try {
      const page = await this.fetch(this.next);
      if (page) this.next = page.next;
    } finally {
      this.loadingOlder = false;
      this.updateFoot();
    }
  }

  async fetch(upto) {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (upto) query.set("upto", upto);
    const res = await api("GET", `/api/presence/latest?${query}`);
    if (!res.ok || !isPlainObject(res.data) || !Array.isArray(res.data.items)) {
      this.status.textContent = res.ok ? "" : `Could not load past events: ${res.message}`;
      return null;
    }
    for (const ev of res.data.items) this.add(ev);
    this.flush();
    return { next: typeof res.data.next_upto === "string" ? res.data.next_upto : null };
  }

  updateFoot() {
    const full = this.entries.length >= this.cap;
    this.olderButton.hidden = !this.next || full;
    this.list.dataset.more = this.next && !full ? "true" : "false";
    if (this.loadingOlder) return;
    if (full) this.status.textContent = `The latest ${this.cap.toLocaleString()} events are shown.`;
    else if (this.next === null) this.status.textContent = this.entries.length ? "No older events are kept." : "No presence events yet.";
    else this.status.textContent = "";
  }
}
