// A virtualised list: only the rows in (and just around) the viewport exist in the DOM.
// Rows are a fixed height and are recycled; the caller supplies an id array and a row painter.

export class VirtualList {
  /**
   * @param {HTMLElement} viewport scrolling element (overflow:auto)
   * @param {{rowHeight:number, overscan?:number, createRow:() => HTMLElement,
   *          paintRow:(el:HTMLElement, id:string, index:number) => void,
   *          onActivate?:(id:string) => void, emptyText?: string}} opts
   */
  constructor(viewport, opts) {
    this.viewport = viewport;
    this.rowHeight = opts.rowHeight;
    this.overscan = opts.overscan ?? 6;
    this.createRow = opts.createRow;
    this.paintRow = opts.paintRow;
    this.onActivate = opts.onActivate;
    this.ids = [];
    this.pool = [];
    this.scheduled = false;

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
    viewport.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" && e.key !== " ") return;
      const row = e.target.closest?.("[data-device-id]");
      if (row && this.onActivate) {
        e.preventDefault();
        this.onActivate(row.dataset.deviceId);
      }
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
      this.paintRow(row, this.ids[index], index);
    }
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
    if (y < vt || y + this.rowHeight > vt + vh) this.viewport.scrollTop = Math.max(0, y - vh / 2);
  }
}
