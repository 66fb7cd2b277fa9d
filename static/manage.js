// Device management for admin keys: register (the token shown once, with a copy button and the
// Python client's connect snippet), rotate a token, delete with confirmation. Native <dialog>s:
// focus moves in and back, Escape cancels.

import { api } from "./api.js";
import { isPlainObject } from "./util.js";

const $ = (id) => document.getElementById(id);

/** The lines a device runs to connect with this gateway's Python client. */
export function connectSnippet(deviceId, token) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return [
    "import asyncio",
    "from gateway.client import DeviceClient",
    "",
    "async def main():",
    `    async with DeviceClient("${scheme}://${location.host}", ${JSON.stringify(deviceId)},`,
    `                            ${JSON.stringify(token)}) as device:`,
    '        await device.report({"status": "ok"})',
    "        await device.wait()",
    "",
    "asyncio.run(main())",
  ].join("\n");
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // no clipboard API (a page served over plain HTTP to another host): copy a selection
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

export class Manager {
  /** @param {{notice:(text:string)=>void, onDeleted:(id:string)=>void, knownTypes:()=>string[]}} hooks */
  constructor(hooks) {
    this.hooks = hooks;
    this.returnFocus = null;
    this.confirmAction = null;
    $("register-open").addEventListener("click", () => this.openRegister());
    $("register-cancel").addEventListener("click", () => $("register-dialog").close());
    $("register-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.register();
    });
    // shown once: nothing of it stays in the page once the dialog is closed, by Done at once
    // (a dialog's close event comes a task later), or by Escape
    const forgetToken = () => {
      $("token-value").value = "";
      $("token-snippet").textContent = "";
    };
    $("token-done").addEventListener("click", () => {
      forgetToken();
      $("token-dialog").close();
    });
    $("token-dialog").addEventListener("close", forgetToken);
    for (const id of ["token-copy", "snippet-copy"]) {
      $(id).addEventListener("click", async (e) => {
        const source = $(e.currentTarget.dataset.copy);
        const ok = await copyText(source.value ?? source.textContent);
        $("copy-state").textContent = ok ? `Copied ${id === "token-copy" ? "the token" : "the snippet"}.` : "Copy failed: select the text and copy it.";
      });
    }
    $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
    $("confirm-ok").addEventListener("click", () => this.runConfirmed());
    for (const dialog of document.querySelectorAll("dialog")) {
      dialog.addEventListener("close", () => {
        if (document.querySelector("dialog[open]")) return; // one dialog led to another
        const target = this.returnFocus;
        this.returnFocus = null;
        if (target && document.contains(target)) target.focus();
      });
    }
  }

  show(dialog) {
    if (!this.returnFocus) this.returnFocus = document.activeElement;
    if (!dialog.open) dialog.showModal();
  }

  openRegister() {
    $("register-error").hidden = true;
    $("known-types").replaceChildren(...this.hooks.knownTypes().map((t) => Object.assign(document.createElement("option"), { value: t })));
    this.show($("register-dialog"));
    $("register-id").focus();
  }

  async register() {
    const error = $("register-error");
    const fail = (text) => {
      error.textContent = text;
      error.hidden = false;
    };
    const body = { device_id: $("register-id").value.trim(), device_type: $("register-type").value.trim() };
    const raw = $("register-metadata").value.trim();
    if (raw) {
      let metadata;
      try {
        metadata = JSON.parse(raw);
      } catch (err) {
        fail(`Metadata is not valid JSON: ${err.message}`);
        return;
      }
      if (!isPlainObject(metadata)) {
        fail("Metadata must be a JSON object.");
        return;
      }
      body.metadata = metadata;
    }
    const button = $("register-submit");
    button.disabled = true;
    const res = await api("POST", "/api/devices", body);
    button.disabled = false;
    if (!res.ok) {
      fail(res.message);
      return;
    }
    error.hidden = true;
    $("register-form").reset();
    $("register-dialog").close();
    this.showToken(body.device_id, res.data?.token, `Registered ${body.device_id}. Its token is shown only this once: the gateway keeps only its hash.`);
  }

  showToken(deviceId, token, intro) {
    $("token-intro").textContent = intro;
    $("token-device").textContent = deviceId;
    $("token-value").value = typeof token === "string" ? token : "";
    $("token-snippet").textContent = connectSnippet(deviceId, token);
    $("copy-state").textContent = "";
    this.show($("token-dialog"));
    $("token-copy").focus();
  }

  confirm({ title, text, ok, action }) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = ok;
    $("confirm-error").hidden = true;
    this.confirmAction = action;
    this.show($("confirm-dialog"));
    $("confirm-cancel").focus();
  }

  async runConfirmed() {
    const action = this.confirmAction;
    if (!action) return;
    const button = $("confirm-ok");
    button.disabled = true;
    const message = await action();
    button.disabled = false;
    if (message) {
      $("confirm-error").textContent = message;
      $("confirm-error").hidden = false;
      return;
    }
    this.confirmAction = null;
    if ($("confirm-dialog").open) $("confirm-dialog").close();
  }

  rotate(deviceId) {
    this.confirm({
      title: `Rotate the token of ${deviceId}?`,
      text: "A new token is issued and shown once. The current token stops working at once, and a session opened with it is closed.",
      ok: "Rotate token",
      action: async () => {
        const res = await api("POST", `/api/devices/${encodeURIComponent(deviceId)}/token`);
        if (!res.ok) return res.message;
        $("confirm-dialog").close();
        this.showToken(deviceId, res.data?.token, `New token for ${deviceId}; the old one no longer works. Shown only this once.`);
        return "";
      },
    });
  }

  remove(deviceId) {
    this.confirm({
      title: `Delete ${deviceId}?`,
      text: "The device is deregistered: its shadow, history and token are removed, and its live connection is closed. This cannot be undone.",
      ok: "Delete device",
      action: async () => {
        const res = await api("DELETE", `/api/devices/${encodeURIComponent(deviceId)}`);
        if (!res.ok) return res.message;
        this.hooks.onDeleted(deviceId);
        this.hooks.notice(`Deleted ${deviceId}.`);
        return "";
      },
    });
  }
}
