// ibkr-oauth-gateway example dashboard: a watchlist with live prices. Plain JavaScript, no build step, no
// dependencies.
//
// 1. Search a symbol:  GET /v1/api/iserver/secdef/search?symbol=AAPL  (through the gateway, which signs it), and
//    add a match to the watchlist, which is kept in localStorage.
// 2. Stream prices:    one WebSocket ws(s)://<this host>/v1/api/ws for the whole list, and for each symbol
//    smd+<conid>+{"fields":["31","84","86"]}  (31 = last, 84 = bid, 86 = ask);  umd+<conid>+{}  when it is removed.
//    The first message of a subscription carries every field, later ones only the fields that changed: each
//    symbol keeps its latest values and every message is merged into them.
// 3. Session restarts:
//    - relay mode: the gateway closes the WebSocket with 1012. Reconnect after a back-off (1 s doubling to 30 s,
//      with jitter) and subscribe every symbol again on the new socket.
//    - shared mode: the socket stays open; the gateway sends {"topic":"gateway","state":"restarting"} and later
//      {"topic":"gateway","state":"ready"}, and renews the subscriptions upstream itself, so nothing is re-sent.
//    IBKR's own {"topic":"sts","args":{"authenticated":…}} and a /health poll also feed the "Session" badge.
// With API keys configured on the gateway, the key pasted below goes in "Authorization: Bearer" for fetch and in
// the "access_key.<key>" WebSocket subprotocol (browsers cannot set headers on a WebSocket).
"use strict";

const FIELDS = {last: "31", bid: "84", ask: "86"};
// Every URL is relative to the page (/examples/dashboard/), so behind a reverse proxy that serves the gateway
// below a prefix (/paper/examples/dashboard/) the calls stay below it too.
const ROOT = new URL("../../", location.href);
const SEARCH_URL = new URL("v1/api/iserver/secdef/search", ROOT).href;
const HEALTH_URL = new URL("health", ROOT).href;    // open to all: says whether the session is ready
const SESSION_URL = new URL("session", ROOT).href;  // needs the key when keys are configured: tells a missing key
const WS_URL = new URL("v1/api/ws", ROOT).href.replace(/^http/, "ws");  // http: -> ws:, https: -> wss:
// Two gateways on one host (/paper/, /live/) share the browser's storage: each prefix keeps its own key and list.
const SUFFIX = ROOT.pathname === "/" ? "" : ":" + ROOT.pathname;
const KEY_STORAGE = "ibkr-gateway-example.api-key" + SUFFIX;
const LIST_STORAGE = "ibkr-gateway-example.watchlist" + SUFFIX;
const MAX_WATCHED = 20;   // IBKR limits how many instruments stream at once
const HISTORY = 60;       // last prices kept for each chart
const FIRST_RETRY_MS = 1000, MAX_RETRY_MS = 30000, STABLE_MS = 30000;
const KEEPALIVE_MS = 50000;  // "tic" keeps IBKR's side of the socket alive (the gateway sends its own as well)
const STS_WAIT_MS = 3000;    // subscribe anyway if no session status arrives this long after the socket opens
const HEALTH_MS = 5000;
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;  // what a WebSocket subprotocol may contain
const FLAGS = {C: "closing price: the market is closed", H: "trading halted"};
const SUBSCRIBE_ARGS = JSON.stringify({fields: Object.values(FIELDS)});

const $ = (id) => document.getElementById(id);
const decoder = new TextDecoder();
const watched = new Map();  // conid -> {conid, symbol, name, values: {field: text}, history: [number], card}
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let conn = null;            // the current WebSocket and what was sent on it, see connect()
let connects = 0;           // WebSockets opened so far (shown as data-connects, handy for tests)
let retryMs = FIRST_RETRY_MS;
let retryTimer = null;
let sessionEvents = 0;      // session news from the WebSocket so far: a /health answer older than one is stale

// ---------------------------------------------------------------- small helpers

function setBadge(el, state, kind, text) {
  el.className = "state " + kind;
  el.dataset.state = state;
  if (el.textContent !== text) el.textContent = text;  // unchanged text is not announced again
}

function setConnection(state, text) {
  const kind = {open: "ok", connecting: "info", closed: "warn", failed: "bad"}[state] || "idle";
  setBadge($("connection"), state, kind, text);
  $("connection").dataset.connects = String(connects);
}

// state: ready | restarting | not-authenticated | read-only | unavailable | unreachable; source: where it came from
function setSession(state, text, source, detail = "") {
  const kind = state === "ready" ? "ok" : state === "unavailable" || state === "unreachable" ? "bad" : "warn";
  const el = $("session");
  setBadge(el, state, kind, text);
  el.dataset.source = source;
  if ($("session-detail").textContent !== detail) $("session-detail").textContent = detail;
  $("session-detail").hidden = !detail;
}

function setMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
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

// IBKR sends prices as text and may put a letter in front ("C227.50": the closing price); commas group thousands.
function splitPrice(text) {
  const match = /^\s*([^\d.+-]*)(.*?)\s*$/.exec(String(text));
  return {flag: match[1], number: match[2], value: parseFloat(match[2].replace(/,/g, ""))};
}

// ---------------------------------------------------------------- the watchlist (localStorage)

function loadList() {
  let saved;
  try {
    saved = JSON.parse(localStorage.getItem(LIST_STORAGE) || "[]");
  } catch (e) {
    return [];  // unreadable: start empty
  }
  if (!Array.isArray(saved)) return [];
  return saved
    .filter((item) => item && /^\d{1,12}$/.test(String(item.conid)))
    .slice(0, MAX_WATCHED)
    .map((item) => ({
      conid: String(item.conid),
      symbol: String(item.symbol || item.conid).slice(0, 32),
      name: String(item.name || "").slice(0, 120),
    }));
}

function saveList() {
  const list = [...watched.values()].map(({conid, symbol, name}) => ({conid, symbol, name}));
  try {
    localStorage.setItem(LIST_STORAGE, JSON.stringify(list));
  } catch (e) {
    setMessage("This browser did not save the watchlist: it lasts until the page is reloaded.", true);
  }
}

function showCount() {
  $("watch-count").textContent = String(watched.size);
  $("empty").hidden = watched.size > 0;
}

function track(instrument) {
  const entry = {...instrument, values: {}, history: [], card: makeCard(instrument)};
  watched.set(entry.conid, entry);
  $("watchlist").append(entry.card);
  return entry;
}

function add(instrument) {
  if (watched.has(instrument.conid)) {
    setMessage(instrument.symbol + " is already on the watchlist.");
    return;
  }
  if (watched.size >= MAX_WATCHED) {
    setMessage("The watchlist holds at most " + MAX_WATCHED + " symbols: remove one first.", true);
    return;
  }
  track(instrument);
  saveList();
  showCount();
  $("results").replaceChildren();
  $("symbol").value = "";
  $("symbol").focus();
  setMessage("Added " + instrument.symbol + ".");
  if (conn) subscribeMissing(); else connect();
}

function remove(conid) {
  const entry = watched.get(conid);
  if (!entry) return;
  watched.delete(conid);
  if (conn && conn.sent.delete(conid) && conn.ws.readyState === WebSocket.OPEN) conn.ws.send("umd+" + conid + "+{}");
  const next = entry.card.nextElementSibling || entry.card.previousElementSibling;
  entry.card.remove();
  saveList();
  showCount();
  (next ? next.querySelector(".remove") : $("symbol")).focus();
  setMessage("Removed " + entry.symbol + ".");
}

function makeCard(instrument) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.conid = instrument.conid;
  card.querySelector(".symbol").textContent = instrument.symbol;
  card.querySelector(".name").textContent = instrument.name;
  card.querySelector(".conid").textContent = instrument.conid;
  const button = card.querySelector(".remove");
  button.setAttribute("aria-label", "Remove " + instrument.symbol);
  button.addEventListener("click", () => remove(instrument.conid));
  return card;
}

function markStale() {
  for (const entry of watched.values()) entry.card.classList.add("stale");
}

// ---------------------------------------------------------------- prices and the chart

function update(entry, message) {
  let changed = false;
  for (const [name, field] of Object.entries(FIELDS)) {
    if (!(field in message)) continue;
    const before = entry.values[field] === undefined ? NaN : splitPrice(entry.values[field]).value;
    entry.values[field] = String(message[field]);
    const after = splitPrice(entry.values[field]);
    showField(entry.card.querySelector("dd." + name), after, before);
    if (name === "last" && !isNaN(after.value) && after.value !== entry.history[entry.history.length - 1]) {
      entry.history.push(after.value);
      if (entry.history.length > HISTORY) entry.history.shift();
      drawChart(entry);
    }
    changed = true;
  }
  if (!changed) return;
  entry.card.classList.remove("stale");
  entry.card.querySelector(".when").textContent = "updated " + new Date().toLocaleTimeString();
  if (conn && Date.now() - conn.openedAt > STABLE_MS) retryMs = FIRST_RETRY_MS;  // a lasting socket resets it
}

function showField(dd, price, before) {
  dd.querySelector(".num").textContent = price.number || "—";
  let flag = dd.querySelector(".flag");
  if (price.flag && !flag) {
    flag = document.createElement("abbr");
    flag.className = "flag";
    dd.append(flag);
  }
  if (price.flag) {
    flag.textContent = price.flag;
    flag.title = FLAGS[price.flag] || "marked " + price.flag + " by IBKR";
  } else if (flag) {
    flag.remove();
  }
  if (isNaN(before) || isNaN(price.value) || before === price.value) return;  // the last move's colour stays
  dd.classList.remove("up", "down", "flash");
  void dd.offsetWidth;  // restart the flash animation
  dd.classList.add(price.value > before ? "up" : "down", "flash");
  dd.dataset.changes = String(Number(dd.dataset.changes || 0) + 1);
}

function drawChart(entry) {
  const svg = entry.card.querySelector(".spark");
  const box = svg.getBoundingClientRect();
  const width = Math.max(40, Math.round(box.width)) || 300, height = Math.max(16, Math.round(box.height)) || 48;
  const pad = 4, points = entry.history;
  const low = Math.min(...points), high = Math.max(...points);
  const step = (width - 2 * pad) / (HISTORY - 1);
  const xy = points.map((value, i) => [
    width - pad - (points.length - 1 - i) * step,  // the newest point on the right edge
    high === low ? height / 2 : height - pad - ((value - low) / (high - low)) * (height - 2 * pad),
  ]);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.querySelector("polyline").setAttribute("points", xy.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1)).join(" "));
  const dot = svg.querySelector("circle"), [x, y] = xy[xy.length - 1];
  dot.setAttribute("cx", x.toFixed(1));
  dot.setAttribute("cy", y.toFixed(1));
  dot.setAttribute("visibility", "visible");
  svg.classList.toggle("down", points[points.length - 1] < points[0]);
  svg.dataset.points = String(points.length);
  svg.setAttribute("aria-label", "Last price, " + points.length + " changes: low " + low + ", high " + high +
                   ", now " + points[points.length - 1]);
}

// ---------------------------------------------------------------- the WebSocket

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (conn || !watched.size) return;  // one socket for the whole list, and none for an empty one
  const protocols = apiKey && TOKEN.test(apiKey) ? ["access_key." + apiKey] : [];
  // A key that is not a valid subprotocol token goes in the query instead (the gateway accepts both).
  const url = apiKey && !TOKEN.test(apiKey) ? WS_URL + "?access_key=" + encodeURIComponent(apiKey) : WS_URL;
  setConnection("connecting", "connecting…");
  const ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";  // IBKR may send its JSON in binary frames
  // sent: conids subscribed on this socket; ready: whether to subscribe now (IBKR's session is authenticated);
  // heard: whether any session status came, else subscribe after STS_WAIT_MS anyway; restarting: the gateway said
  // "restarting" and not yet "ready".
  const c = {ws, sent: new Set(), ready: false, heard: false, restarting: false, opened: false, openedAt: 0,
             timers: []};
  conn = c;
  ws.addEventListener("open", () => {
    connects += 1;
    c.opened = true;
    c.openedAt = Date.now();
    setConnection("open", "open, waiting for the session");
    c.timers.push(setTimeout(() => c === conn && !c.heard && upstreamReady(c), STS_WAIT_MS));
    c.timers.push(setInterval(() => ws.readyState === WebSocket.OPEN && ws.send("tic"), KEEPALIVE_MS));
  });
  ws.addEventListener("message", (event) => onMessage(c, event.data));
  ws.addEventListener("close", (event) => onClose(c, event));
}

function upstreamReady(c) {
  c.ready = true;
  setConnection("open", "open");
  subscribeMissing();
}

function subscribeMissing() {
  const c = conn;
  if (!c || !c.ready || c.ws.readyState !== WebSocket.OPEN) return;
  for (const conid of watched.keys()) {
    if (c.sent.has(conid)) continue;
    c.ws.send("smd+" + conid + "+" + SUBSCRIBE_ARGS);
    c.sent.add(conid);
  }
}

function onMessage(c, data) {
  if (c !== conn) return;
  let message;
  try {
    message = JSON.parse(typeof data === "string" ? data : decoder.decode(data));
  } catch (e) {
    return;  // e.g. the raw "ech+hb" echo
  }
  if (!message || typeof message !== "object") return;
  const topic = typeof message.topic === "string" ? message.topic : "";
  if (topic === "sts" && message.args && typeof message.args.authenticated === "boolean") {
    c.heard = true;
    sessionEvents += 1;
    if (message.args.authenticated) {
      setSession("ready", "ready", "sts");
      upstreamReady(c);
    } else {
      // IBKR's brokerage session is down: subscribe again once it is back.
      c.ready = false;
      c.sent.clear();
      setSession("not-authenticated", "IBKR session not authenticated", "sts");
      setConnection("open", "open, waiting for the session");
      markStale();
    }
  } else if (topic === "gateway") {
    c.heard = true;
    sessionEvents += 1;
    onGatewayNotice(c, String(message.state || "").slice(0, 40));
  } else if (topic.startsWith("smd+")) {
    const entry = watched.get(topic.slice(4));
    if (!entry) return;  // e.g. a late update for a symbol just removed
    if (message.error) { setMessage(entry.symbol + ": " + message.error, true); return; }
    update(entry, message);
  }
}

// Shared mode: the gateway keeps the socket open across a session restart and renews the subscriptions itself.
function onGatewayNotice(c, state) {
  if (state === "restarting") {
    c.ready = false;  // hold symbols added meanwhile until "ready"; those already sent stay subscribed
    c.restarting = true;
    setSession("restarting", "restarting: the gateway is opening a new IBKR session", "gateway");
    setConnection("open", "open, waiting for the session");
    markStale();
  } else if (state === "ready") {
    c.restarting = false;
    setSession("ready", "ready", "gateway");
    upstreamReady(c);  // sends only what was added during the restart
  } else if (state) {
    setSession(state, "gateway: " + state, "gateway");
  }
}

function onClose(c, event) {
  for (const timer of c.timers) { clearTimeout(timer); clearInterval(timer); }
  if (c !== conn) return;
  conn = null;
  markStale();
  if (!watched.size) { setConnection("idle", "not connected"); return; }
  if (event.code === 1012) {
    sessionEvents += 1;
    setSession("restarting", "restarting: the gateway is opening a new IBKR session", "close");
  }
  if (!c.opened) checkKey();  // a refused upgrade shows as 1006 only: ask the gateway whether a key is missing
  const why = event.code === 1012 ? "the gateway restarted its IBKR session"
    : event.code === 1001 ? "the gateway is shutting down or restarting"
    : event.code === 1013 ? "the gateway has too many WebSockets open"
    : event.code === 1006 ? "connection lost" : "closed with code " + event.code;
  const delay = Math.round(retryMs * (0.5 + Math.random() / 2));
  retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
  setConnection("closed", "closed, reconnecting in " + Math.max(1, Math.round(delay / 1000)) + " s (" + why + ")");
  retryTimer = setTimeout(connect, delay);
}

async function checkKey() {
  let response;
  try {
    response = await fetch(SESSION_URL, {headers: authHeaders(), cache: "no-store"});
  } catch (e) {
    return;
  }
  if (response.status !== 401 || conn) return;
  clearTimeout(retryTimer);  // no use retrying until there is a key
  setConnection("failed", "closed: the gateway wants an API key");
  needKey();
}

// ---------------------------------------------------------------- /health

async function pollHealth() {
  const before = sessionEvents;
  let status = 0, body = null;
  try {
    const response = await fetch(HEALTH_URL, {cache: "no-store"});
    status = response.status;
    body = await response.json();
  } catch (e) { /* unreachable, or not JSON */ }
  if (sessionEvents === before) {  // else the WebSocket said something newer meanwhile
    if (!status) {
      setSession("unreachable", "gateway unreachable", "health");
    } else if (body && body.status === "ok") {
      // A new session is up, but in shared mode the stream is back only when the gateway says "ready".
      if (!(conn && conn.restarting)) setSession("ready", "ready", "health");
    } else {
      const error = body && typeof body.last_error === "string" ? "Last error: " + body.last_error : "";
      if (body && body.status === "read-only") {
        setSession("read-only", "read-only: IBKR's brokerage session is down", "health", error);
      } else {
        const state = body && typeof body.state === "string" ? " (" + body.state + ")" : "";
        setSession("unavailable", "not ready" + state, "health", error);
      }
    }
  }
  setTimeout(pollHealth, HEALTH_MS);
}

// ---------------------------------------------------------------- search (REST through the gateway)

async function search(symbol) {
  setMessage("Searching " + symbol + "…");
  $("results").replaceChildren();
  let response;
  try {
    response = await fetch(SEARCH_URL + "?symbol=" + encodeURIComponent(symbol),
                           {headers: authHeaders(), cache: "no-store"});
  } catch (e) {
    setMessage("The gateway did not answer.", true);
    return;
  }
  if (response.status === 401) { needKey(); return; }
  if (!response.ok) { setMessage("Search failed: " + await errorText(response), true); return; }
  let found;
  try {
    found = await response.json();
  } catch (e) {
    setMessage("Search failed: the answer was not JSON.", true);
    return;
  }
  const items = Array.isArray(found) ? found.filter((item) => item && /^\d{1,12}$/.test(String(item.conid))) : [];
  if (!items.length) { setMessage("Nothing found for " + symbol + "."); return; }
  setMessage(items.length === 1 ? "1 match: add it to the watchlist." : items.length + " matches: add one.");
  for (const item of items) {
    const conid = String(item.conid);
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.conid = conid;
    const label = [item.symbol, item.companyHeader || item.companyName, "conid " + conid].filter(Boolean).join(" · ");
    button.textContent = (watched.has(conid) ? "Watching: " : "Add ") + label;
    button.disabled = watched.has(conid);
    button.addEventListener("click", () => add({
      conid, symbol: String(item.symbol || symbol).slice(0, 32), name: String(item.companyName || "").slice(0, 120),
    }));
    const li = document.createElement("li");
    li.append(button);
    $("results").append(li);
  }
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
  setMessage(apiKey ? (watched.size ? "Key set." : "Key set. Search again.") : "");
  retryMs = FIRST_RETRY_MS;
  if (conn) conn.ws.close(1000); else connect();  // (re)connect with the new key
});

$("forget-key").addEventListener("click", () => {
  apiKey = "";
  sessionStorage.removeItem(KEY_STORAGE);
  showKeyState();
});

showKeyState();
for (const instrument of loadList()) track(instrument);
showCount();
connect();
pollHealth();
