// REST helper: same-origin cookie auth, problem+json errors, a hook for "auth required".

import { problemText } from "./util.js";

let onAuthRequired = () => {};

export function setAuthHandler(fn) {
  onAuthRequired = typeof fn === "function" ? fn : () => {};
}

/**
 * Call the API. Never throws. Resolves to
 * {ok, status, data, problem, message} where message is "title: detail" on failure.
 */
export async function api(method, url, body, { authHook = true } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch (err) {
    return { ok: false, status: 0, data: null, problem: null, message: `Network error: ${err?.message || err}` };
  }
  let data = null;
  const text = await res.text().catch(() => "");
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (res.ok) return { ok: true, status: res.status, data, problem: null, message: "" };
  if (res.status === 401 && authHook) {
    try {
      onAuthRequired(problemText(data, res.status));
    } catch (err) {
      console.error("auth handler failed", err);
    }
  }
  return { ok: false, status: res.status, data: null, problem: data, message: problemText(data, res.status) };
}
