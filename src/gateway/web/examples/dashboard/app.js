// ibkr-oauth-gateway example dashboard: plain JavaScript, no build step, no dependencies.
//
// 1. Search a symbol:   GET /v1/api/iserver/secdef/search?symbol=AAPL   (through the gateway, which signs it)
// 2. Stream its prices: WebSocket ws(s)://<this host>/v1/api/ws, then  smd+<conid>+{"fields":["31","84","86"]}
//    (31 = last, 84 = bid, 86 = ask); updates carry only the fields that changed.
// 3. When the gateway restarts its IBKR session it closes the WebSocket with 1012: reconnect after a back-off
//    (1 s doubling to 30 s, with jitter) and subscribe again.
// With API keys configured on the gateway, the key pasted below goes in "Authorization: Bearer" for fetch and in
// the "access_key.<key>" WebSocket subprotocol (browsers cannot set headers on a WebSocket).
"use strict";

const FIELDS = {last: "31", bid: "84", ask: "86"};
const SEARCH_PATH = "/v1/api/iserver/secdef/search";
const WS_URL = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/api/ws";
const KEY_STORAGE = "ibkr-gateway-example.api-key";
const FIRST_RETRY_MS = 1000, MAX_RETRY_MS = 30000, STABLE_MS = 30000, KEEPALIVE_MS = 30000;
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;  // what a WebSocket subprotocol may contain

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let chosen = null;        // {conid, symbol, name} being watched
let socket = null;        // the open (or opening) WebSocket
let retryMs = FIRST_RETRY_MS;
let retryTimer = null;
let openedAt = 0;
let connects = 0;         // WebSockets opened so far (shown as data-connects, handy for tests)
let keepalive = null;
let subscribed = null;    // conid subscribed on the current socket
const decoder = new TextDecoder();

function setState(kind, text) {
  const el = $("connection");
  el.className = "state " + kind;
  el.textContent = text;
  el.dataset.connects = String(connects);
}

function setMessage(text, isError = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function authHeaders() {
  return apiKey ? {Authorization: "Bearer " + apiKey} : {};
}

function showKeyState() {
  $("key-state").textContent = apiKey ? "(set for this tab)" : "(none set)";
}

function needKey() {
  setMessage("The gateway wants an API key: paste it below.", true);
  $("key-box").open = true;
  $("api-key").focus();
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

// ---------------------------------------------------------------- search (REST through the gateway)

async function search(symbol) {
  setMessage("Searching " + symbol + "…");
  $("results").replaceChildren();
  let response;
  try {
    response = await fetch(SEARCH_PATH + "?symbol=" + encodeURIComponent(symbol),
                           {headers: authHeaders(), cache: "no-store"});
  } catch (e) {
    setMessage("The gateway did not answer.", true);
    return;
  }
  if (response.status === 401) { needKey(); return; }
  if (!response.ok) { setMessage("Search failed: " + await errorText(response), true); return; }
  const found = await response.json();
  const items = Array.isArray(found) ? found.filter((item) => item && item.conid) : [];
  if (!items.length) { setMessage("Nothing found for " + symbol + "."); return; }
  setMessage(items.length === 1 ? "1 match: pick it to stream prices." : items.length + " matches: pick one.");
  for (const item of items) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.conid = String(item.conid);
    button.textContent = [item.symbol, item.companyHeader || item.companyName, "conid " + item.conid]
      .filter(Boolean).join(" · ");
    button.addEventListener("click", () => watch({
      conid: String(item.conid), symbol: String(item.symbol || symbol), name: String(item.companyName || ""),
    }, button));
    const li = document.createElement("li");
    li.append(button);
    $("results").append(li);
  }
}

// ---------------------------------------------------------------- streaming (the gateway's WebSocket)

function watch(instrument, button) {
  for (const other of document.querySelectorAll("#results button")) other.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-pressed", "true");
  chosen = instrument;
  $("quote").hidden = false;
  $("quote-symbol").textContent = instrument.symbol;
  $("quote-name").textContent = instrument.name;
  $("quote-conid").textContent = instrument.conid;
  for (const name of Object.keys(FIELDS)) { $(name).textContent = "—"; $(name).className = ""; }
  $("updated").textContent = "—";
  if (socket && socket.readyState === WebSocket.OPEN) subscribe();
  else connect();
}

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (socket) return;  // already open or opening; it subscribes when ready
  const protocols = apiKey && TOKEN.test(apiKey) ? ["access_key." + apiKey] : [];
  // A key that is not a valid subprotocol token goes in the query instead (the gateway accepts both).
  const url = apiKey && !TOKEN.test(apiKey) ? WS_URL + "?access_key=" + encodeURIComponent(apiKey) : WS_URL;
  setState("connecting", "connecting…");
  const ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";  // IBKR may send its JSON in binary frames
  socket = ws;
  subscribed = null;
  ws.addEventListener("open", () => {
    connects += 1;
    openedAt = Date.now();
    setState("connected", "connected, waiting for the session");
    setTimeout(() => ws === socket && subscribed === null && subscribe(), 3000);  // in case no "sts" arrives
    keepalive = setInterval(() => ws.readyState === WebSocket.OPEN && ws.send("tic"), KEEPALIVE_MS);
  });
  ws.addEventListener("message", (event) => onMessage(ws, event.data));
  ws.addEventListener("close", (event) => onClose(ws, event));
}

function subscribe() {
  if (!chosen || !socket || socket.readyState !== WebSocket.OPEN) return;
  if (subscribed && subscribed !== chosen.conid) socket.send("umd+" + subscribed + "+{}");
  socket.send("smd+" + chosen.conid + "+" + JSON.stringify({fields: Object.values(FIELDS)}));
  subscribed = chosen.conid;
  setState("connected", "subscribed to " + chosen.symbol);
}

function onMessage(ws, data) {
  if (ws !== socket) return;
  let message;
  try {
    message = JSON.parse(typeof data === "string" ? data : decoder.decode(data));
  } catch (e) {
    return;  // e.g. the raw "ech+hb" echo
  }
  if (!message || typeof message !== "object") return;
  if (message.topic === "sts" && message.args && message.args.authenticated === true) {
    subscribe();  // the brokerage session is ready for market data
  } else if (message.topic === "sts" && message.args && message.args.authenticated === false) {
    setState("retrying", "IBKR session not authenticated");
  } else if (chosen && message.topic === "smd+" + chosen.conid) {
    if (message.error) { setMessage("Market data: " + message.error, true); return; }
    showPrices(message);
  }
}

function showPrices(update) {
  let changed = false;
  for (const [name, field] of Object.entries(FIELDS)) {
    if (!(field in update)) continue;
    const el = $(name);
    const before = parseFloat(el.textContent);
    const after = parseFloat(String(update[field]).replace(/^[A-Z]/, ""));  // IBKR may prefix C (close), H (halted)
    el.textContent = String(update[field]);
    el.className = isNaN(before) || isNaN(after) || before === after ? "" : (after > before ? "up" : "down");
    changed = true;
  }
  if (!changed) return;
  $("updated").textContent = new Date().toLocaleTimeString();
  setState("live", "live");
  if (Date.now() - openedAt > STABLE_MS) retryMs = FIRST_RETRY_MS;  // a connection that lasted resets the back-off
}

function onClose(ws, event) {
  if (ws !== socket) return;
  socket = null;
  subscribed = null;
  clearInterval(keepalive);
  if (!chosen) { setState("idle", "not connected"); return; }
  const why = event.code === 1012 ? "the gateway restarted its IBKR session"
    : event.code === 1001 ? "the gateway is shutting down or restarting"
    : event.code === 1013 ? "the gateway has too many WebSockets open"
    : event.code === 1006 ? "connection lost" : "closed with code " + event.code;
  const delay = Math.round(retryMs * (0.5 + Math.random() / 2));
  retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
  setState("retrying", "reconnecting in " + Math.max(1, Math.round(delay / 1000)) + " s (" + why + ")");
  retryTimer = setTimeout(connect, delay);
}

// ---------------------------------------------------------------- wiring

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const symbol = $("symbol").value.trim().toUpperCase();
  if (symbol) search(symbol);
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  $("api-key").value = "";
  if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey); else sessionStorage.removeItem(KEY_STORAGE);
  showKeyState();
  $("key-box").open = false;
  setMessage(apiKey ? "Key set. Search again." : "");
  if (socket) socket.close(1000);  // reconnect with the new key
});

$("forget-key").addEventListener("click", () => {
  apiKey = "";
  sessionStorage.removeItem(KEY_STORAGE);
  showKeyState();
});

showKeyState();
