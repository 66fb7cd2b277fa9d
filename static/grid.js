// A virtualised list: only the rows in (and just around) the viewport exist in the DOM.
// Rows are a fixed height and are recycled; the caller supplies an id array and a row painter.

export class VirtualList {
  /**
   * @param {HTMLElement} viewport scrolling element (overflow:auto)
   * @param {{rowHeight:number, overscan?:number, createRow:() => HTMLElement,
   *          paintRow:(el:HTMLElement, id:string, index:number) => void,
   *          onActivate?:(id:string) => void, onRange?:(first:number, last:number) => void,
   *          emptyText?: string}} opts
   */
  constructor(viewport, opts) {
    this.viewport = viewport;
    this.rowHeight = opts.rowHeight;
    this.overscan = opts.overscan ?? 6;
    this.createRow = opts.createRow;
    this.paintRow = opts.paintRow;
    this.onActivate = opts.onActivate;
    this.onRange = opts.onRange;
    this.ids = [];
    this.pool = [];
    this.scheduled = false;
    this.activeId = null; // the one row Tab stops at (a roving tabindex); arrows move it

    this.spacer = document.createElement("div");
    this.spacer.className = "vl-spacer";
    this.empty = document.createElement("div");
    this.empty.className = "vl-empty";
    this.empty.textContent = opts.emptyText ?? "Nothing to show";
    this.empty.hidden = true;
    viewport.append(this.spacer, this.empty);

    viewport.addEventListener("scroll", () => this.schedule(), { passive: true });
    viewport.addEventListener("click", (e) => {
      const row = e.target.closest?.("[data-device-id]");
      if (row && viewport.contains(row) && this.onActivate) this.onActivate(row.dataset.deviceId);
    });
    viewport.addEventListener("focusin", (e) => {
      const row = e.target.closest?.("[data-device-id]");
      if (!row) return;
      this.activeId = row.dataset.deviceId;
      this.updateTabStops();
    });
    viewport.addEventListener("keydown", (e) => {
      const row = e.target.closest?.("[data-device-id]");
      if (!row) return;
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        this.onActivate?.(row.dataset.deviceId);
        return;
      }
      const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: 10, PageUp: -10, Home: -Infinity, End: Infinity };
      if (!(e.key in moves)) return;
      e.preventDefault();
      const i = this.ids.indexOf(row.dataset.deviceId);
      const next = Math.max(0, Math.min(this.ids.length - 1, i + moves[e.key]));
      this.focusIndex(next);
    });
    if (typeof ResizeObserver === "function") {
      new ResizeObserver(() => this.schedule()).observe(viewport);
    } else {
      window.addEventListener("resize", () => this.schedule());
    }
  }

  setItems(ids) {
    this.ids = ids;
    this.spacer.style.height = `${ids.length * this.rowHeight}px`;
    this.empty.hidden = ids.length !== 0;
    this.render();
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.render();
    });
  }

  /** Repaint the rows currently in view (cheap: a few dozen rows). */
  render() {
    const n = this.ids.length;
    const h = this.rowHeight;
    const viewH = this.viewport.clientHeight || 600;
    const top = this.viewport.scrollTop;
    const first = Math.max(0, Math.floor(top / h) - this.overscan);
    const last = Math.min(n, Math.ceil((top + viewH) / h) + this.overscan);
    const count = Math.max(0, last - first);

    while (this.pool.length < count) {
      const row = this.createRow();
      row.style.position = "absolute";
      row.style.left = "0";
      row.style.right = "0";
      row.style.height = `${h}px`;
      this.pool.push(row);
      this.viewport.append(row);
    }
    while (this.pool.length > count) this.pool.pop().remove();

    for (let i = 0; i < count; i++) {
      const index = first + i;
      const row = this.pool[i];
      const y = index * h;
      if (row._y !== y) {
        row.style.transform = `translateY(${y}px)`;
        row._y = y;
      }
      row.setAttribute("aria-rowindex", String(index + 1));
      this.paintRow(row, this.ids[index], index);
    }
    this.updateTabStops();
    this.onRange?.(first, last);
  }

  /** Tab reaches the list once: at the active row, or the first one in view. */
  updateTabStops() {
    const top = this.viewport.scrollTop;
    let stop = this.pool.find((row) => row.dataset.deviceId === this.activeId);
    stop ??= this.pool.find((row) => row._y >= top) ?? this.pool[0];
    for (const row of this.pool) row.tabIndex = row === stop ? 0 : -1;
  }

  /** Move keyboard focus to the row at *index*, scrolling it into view first. */
  focusIndex(index) {
    const id = this.ids[index];
    if (id === undefined) return;
    this.scrollToId(id);
    this.render();
    const row = this.pool.find((r) => r.dataset.deviceId === id);
    row?.focus({ preventScroll: true });
  }

  /** Focus the row of *id* if it is listed (after the panel closes), else the list. */
  focusId(id) {
    const i = this.ids.indexOf(id);
    if (i >= 0) this.focusIndex(i);
    else this.viewport.focus();
  }

  /** Calls fn(row, id) for each rendered row (e.g. to tick "last seen"). */
  forEachRendered(fn) {
    for (const row of this.pool) {
      const id = row.dataset.deviceId;
      if (id !== undefined) fn(row, id);
    }
  }

  scrollToId(id) {
    const i = this.ids.indexOf(id);
    if (i < 0) return;
    const y = i * this.rowHeight;
    const vt = this.viewport.scrollTop;
    const vh = this.viewport.clientHeight;
    if (y < vt) this.viewport.scrollTop = y;
    else if (y + this.rowHeight > vt + vh) this.viewport.scrollTop = y + this.rowHeight - vh;
  }
}
