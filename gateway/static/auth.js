// The page's access token (README "Security"): when the gateway sets LIPSYNC_AUTH_TOKEN, every
// API call and WebSocket needs it. The user types it into the token field (shown when the
// gateway answers 401), or opens the page as /?token=...; it is kept in sessionStorage (this
// tab only) and taken out of the address bar at once. API calls send it as
// `Authorization: Bearer <token>`; WebSockets, which cannot carry headers from a browser, as
// the `token` query parameter. The gateway never puts either into its access log.
"use strict";

(() => {
  const KEY = "lipsync-token";
  const url = new URL(location.href);
  if (url.searchParams.has("token")) {
    sessionStorage.setItem(KEY, url.searchParams.get("token"));
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  const form = document.getElementById("token-form");
  const field = document.getElementById("token");

  const auth = {
    token: () => sessionStorage.getItem(KEY) || "",
    // headers for fetch(): the token, if any
    headers() {
      const token = auth.token();
      return token ? { Authorization: `Bearer ${token}` } : {};
    },
    // ws:// or wss:// URL of a WebSocket path on this gateway, with the token
    wsUrl(path) {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const token = auth.token();
      return `${scheme}://${location.host}${path}` + (token ? `?token=${encodeURIComponent(token)}` : "");
    },
    // the gateway refused the token (or there was none): ask the user for one
    ask() {
      form.hidden = false;
      field.focus();
    },
  };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, field.value.trim());
    field.value = "";
    form.hidden = true;
    window.dispatchEvent(new Event("lipsync-token"));
  });
  window.lipsyncAuth = auth;
})();
