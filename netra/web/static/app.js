// The chat page: sign-in, the thread list, the conversation, and the wiring
// from server events to the views. No framework: the page is small enough
// that plain DOM calls stay readable, and nothing needs building.

import { approvalRefused, historyApprovals, trackApproval } from "./approval.js";
import { Connection, closeText } from "./conn.js";
import { RunView, errorText, threadItem, userTurn } from "./view.js";

const TOKEN_KEY = "netra.token";
const DEV_KEY = "netra.token.dev"; // the token came from /api/dev-token: renew it the same way
const $ = (id) => document.getElementById(id);

const app = {
  conn: null,
  userId: null,
  threadId: null,
  everConnected: false,
  devRenewedAt: 0, // last automatic renewal of a development token (at most one per 30 s)
  history: null, // true / false once /api/threads answered: does the server keep threads?
  pending: new Map(), // client message id -> RunView, until the run has an id
  runs: new Map(), // run id -> RunView, until its terminal event
};

// -- small helpers ------------------------------------------------------------

function showAlert(text) {
  $("alert-text").textContent = text;
  $("alert").hidden = false;
}

function hideAlert() {
  $("alert").hidden = true;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${app.token}` } });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  return { status: response.status, body };
}

// The log follows the conversation while it is scrolled to the end; once the
// reader scrolls up, new text no longer pulls the view down, until they
// scroll back to the end. Answers render a frame after their events, so a
// ResizeObserver on the messages does the following, before the paint.
const follow = { pinned: true, top: -1 }; // top: where we last scrolled the log

function scrollToEnd() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
  follow.pinned = true;
  follow.top = log.scrollTop;
}

function followLog() {
  const log = $("log");
  log.addEventListener("scroll", () => {
    if (log.scrollTop === follow.top) return; // our own scroll, not the reader's
    follow.pinned = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  });
  const keepUp = new ResizeObserver(() => { if (follow.pinned) scrollToEnd(); });
  keepUp.observe($("messages"));
  keepUp.observe(log); // the log itself shrinks when the window or the composer changes
}

function updateStop() {
  $("stop").disabled = app.runs.size === 0 && app.pending.size === 0;
}

function setThread(threadId) {
  app.threadId = threadId;
  const url = threadId ? `#thread=${encodeURIComponent(threadId)}` : location.pathname + location.search;
  history.replaceState(null, "", url);
  for (const button of document.querySelectorAll("#thread-list button")) {
    if (button.dataset.id === threadId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

// -- sign-in --------------------------------------------------------------------

function showSignIn(message) {
  $("sign-in").hidden = false;
  $("chat").hidden = true;
  $("sign-out").hidden = true;
  $("threads-toggle").hidden = true;
  $("dev-token").hidden = document.documentElement.dataset.devMode !== "true";
  setStatus("signed-out", "Signed out");
  if (message) showAlert(message);
  $("token-input").focus();
}

function signIn(token, { dev = false } = {}) {
  token = token.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  if (dev) sessionStorage.setItem(DEV_KEY, "1");
  else sessionStorage.removeItem(DEV_KEY);
  app.token = token;
  hideAlert();
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
  app.everConnected = false;
  app.conn = new Connection({ url: wsUrl(), token, onEvent, onState });
  app.conn.start();
  $("input").focus();
}

// keepThread: the token expired; signing in again continues where it was.
function signOut(message, { keepThread = false } = {}) {
  if (app.conn) app.conn.stop();
  app.conn = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(DEV_KEY);
  interruptAll("Stopped: signed out.");
  if (!keepThread) {
    setThread(null);
    $("messages").replaceChildren();
    $("thread-list").replaceChildren();
    $("empty").hidden = false;
  }
  showSignIn(message);
}

function wsUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

async function useDevToken() {
  try {
    const response = await fetch("/api/dev-token");
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.message || `HTTP ${response.status}`);
    signIn(body.token, { dev: true });
  } catch (err) {
    showAlert(`Could not get a development token: ${err.message}`);
  }
}

// -- connection state -----------------------------------------------------------

function onState(change) {
  switch (change.state) {
    case "connecting":
      setStatus("connecting", change.attempt ? "Reconnecting…" : "Connecting…");
      break;
    case "open": {
      const again = app.everConnected;
      app.everConnected = true;
      app.userId = change.userId;
      setStatus("open", `Connected as ${change.userId}`);
      if (again) hideAlert();
      if (change.resumed) break; // the session came back: its runs go on where they were
      if (again) interruptAll("Stopped: the connection was lost before the run finished.");
      loadThreads();
      // runs that did not come back with the session: read back what was kept
      if (again && app.threadId) loadThread(app.threadId);
      break;
    }
    case "waiting": {
      // a drop is resumed: the runs on screen wait for their session to come back
      if (!change.resuming) interruptAll("Stopped: the connection was lost before the run finished.");
      const seconds = Math.max(1, Math.round(change.delayMs / 1000));
      setStatus("waiting", `Reconnecting in ${seconds} s…`);
      // keep saying why the connection ended; failed attempts after it add nothing
      if (change.wasOpen || $("alert").hidden) showAlert(`${closeText(change.code, change.reason)} Reconnecting…`);
      break;
    }
    case "closed":
      interruptAll("Stopped: the connection closed.");
      if (change.code === 4401 && sessionStorage.getItem(DEV_KEY) && Date.now() - app.devRenewedAt > 30000) {
        // a development server restarted with a new secret: fetch a token from it again
        app.devRenewedAt = Date.now();
        signOut(null, { keepThread: true });
        useDevToken();
      } else if (change.code === 4401) {
        signOut(closeText(change.code, change.reason), { keepThread: true });
      } else {
        setStatus("closed", "Disconnected");
        showAlert(`${closeText(change.code, change.reason)} Reload the page to connect again.`);
      }
      break;
  }
}

function interruptAll(text) {
  for (const view of [...app.pending.values(), ...app.runs.values()]) view.interrupted(text);
  app.pending.clear();
  app.runs.clear();
  updateStop();
}

// -- server events ----------------------------------------------------------------

function viewFor(event) {
  let view = event.run_id ? app.runs.get(event.run_id) : undefined;
  if (!view && event.ref && app.pending.has(event.ref)) {
    view = app.pending.get(event.ref);
    app.pending.delete(event.ref);
    app.runs.set(event.run_id, view);
    view.runId = event.run_id;
    view.threadId = event.thread_id;
    // a new conversation gets its id from its first run, if it is still on screen
    if (app.threadId === null && view.node.isConnected) setThread(event.thread_id);
    if (view.stopWanted) app.conn.send({ type: "cancel", run_id: event.run_id });
  }
  return view;
}

function onEvent(event) {
  if (event.type === "error") return onError(event);
  if (!event.run_id) return; // connected, pong: handled by the connection
  const view = viewFor(event);
  if (!view) return;
  switch (event.type) {
    case "run_queued": view.queued(event.position); break;
    case "agent_started": view.started(event); break;
    case "agent_thinking": view.thinking(event); break;
    case "tool_executing": view.toolExecuting(event); break;
    case "tool_completed": view.toolCompleted(event); break;
    case "text_delta": view.delta(event); break;
    case "agent_completed": view.completed(event); break;
    case "agent_error": view.failed(event); break;
    case "agent_cancelled": view.cancelled(event); break;
  }
  trackApproval(view, event, decide);
  if (view.finished) {
    app.runs.delete(event.run_id);
    if (app.history) loadThreads();
  }
  updateStop();
}

function onError(event) {
  if (approvalRefused(event)) return;
  const view = event.ref ? app.pending.get(event.ref) : undefined;
  if (view) {
    app.pending.delete(event.ref);
    view.refused(event);
    updateStop();
  } else {
    showAlert(`The server refused a message — ${errorText(event)}`);
  }
}

// -- sending ------------------------------------------------------------------------

function send() {
  const text = $("input").value;
  if (!text.trim()) return;
  const id = newId();
  const message = { type: "user_message", text, id };
  if (app.threadId) message.thread_id = app.threadId;
  if (!app.conn || !app.conn.send(message)) {
    showAlert("Not connected: the message was not sent. It is still in the box; send it again once connected.");
    return;
  }
  $("input").value = "";
  $("empty").hidden = true;
  const view = new RunView();
  view.threadId = app.threadId;
  view.userNode = userTurn(text);
  app.pending.set(id, view);
  $("messages").append(view.userNode, view.node);
  updateStop();
  scrollToEnd();
}

// A tool_decision (from approval.js); false when it could not be sent.
function decide(message) {
  return Boolean(app.conn && app.conn.send(message));
}

function stop() {
  for (const runId of app.runs.keys()) app.conn.send({ type: "cancel", run_id: runId });
  for (const view of app.pending.values()) view.stopWanted = true; // cancelled once it has an id
}

// -- threads ---------------------------------------------------------------------------

async function loadThreads() {
  let answer;
  try {
    answer = await api("/api/threads");
  } catch {
    return; // offline: the next connect tries again
  }
  if (answer.status === 404) {
    app.history = false; // the server keeps no history: no list to show
    $("threads").hidden = true;
    $("threads-toggle").hidden = true;
    return;
  }
  if (answer.status !== 200) return;
  app.history = true;
  $("threads").hidden = false;
  $("threads-toggle").hidden = false;
  const list = $("thread-list");
  list.replaceChildren(...answer.body.threads.map((t) => threadItem(t, app.threadId, selectThread)));
}

function selectThread(threadId) {
  if (threadId === app.threadId && $("messages").childElementCount) return;
  setThread(threadId);
  toggleThreads(false);
  loadThread(threadId);
}

async function loadThread(threadId) {
  let answer;
  try {
    answer = await api(`/api/threads/${encodeURIComponent(threadId)}`);
  } catch {
    return;
  }
  if (threadId !== app.threadId) return; // another thread was chosen meanwhile
  if (answer.status === 404 && answer.body && answer.body.code === "not_found" && app.history) {
    showAlert("That conversation no longer exists.");
    newThread();
    return;
  }
  if (answer.status !== 200) return; // no store: keep what is on screen
  // a run of this thread still streaming on this connection stays as it is
  const live = [...app.pending.values(), ...app.runs.values()].filter((v) => v.threadId === threadId);
  const liveIds = new Set(live.map((v) => v.runId));
  const turns = historyTurns(answer.body, liveIds);
  $("messages").replaceChildren(...turns, ...live.flatMap((v) => [v.userNode, v.node]));
  $("empty").hidden = $("messages").childElementCount > 0;
  scrollToEnd();
}

// Each user message followed by its run's turn. A run that stopped before
// writing any text has no stored answer, but still shows its tools and outcome.
function historyTurns({ messages, runs }, skipRuns) {
  const runById = new Map(runs.map((r) => [r.id, r]));
  const answers = new Map(messages.filter((m) => m.role === "assistant").map((m) => [m.run_id, m]));
  const turns = [];
  for (const message of messages) {
    if (skipRuns.has(message.run_id)) continue;
    if (message.role === "user") {
      turns.push(userTurn(message.text));
      if (!message.run_id) continue;
      const answer = answers.get(message.run_id) || { text: "", run_id: message.run_id };
      turns.push(historyTurn(answer, runById.get(message.run_id)));
    } else if (!messages.some((m) => m.role === "user" && m.run_id === message.run_id)) {
      turns.push(historyTurn(message, runById.get(message.run_id)));
    }
  }
  return turns;
}

function historyTurn(message, run) {
  const view = RunView.fromHistory(message, run);
  historyApprovals(view, run, decide);
  return view.node;
}

function newThread() {
  setThread(null);
  $("messages").replaceChildren();
  $("empty").hidden = false;
  toggleThreads(false);
  $("input").focus();
}

function toggleThreads(open) {
  const nav = $("threads");
  const show = open ?? !nav.classList.contains("open");
  nav.classList.toggle("open", show);
  $("threads-toggle").setAttribute("aria-expanded", String(show));
}

// -- wiring -------------------------------------------------------------------------------

function init() {
  followLog();
  $("sign-in-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("token-input").value);
  });
  $("dev-token").addEventListener("click", useDevToken);
  $("sign-out").addEventListener("click", () => signOut());
  $("alert-close").addEventListener("click", hideAlert);
  $("new-thread").addEventListener("click", newThread);
  $("threads-toggle").addEventListener("click", () => toggleThreads());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("stop").addEventListener("click", stop);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("chat").hidden && !$("stop").disabled) {
      e.preventDefault();
      stop();
    }
  });
  const match = location.hash.match(/^#thread=(.+)$/);
  if (match) app.threadId = decodeURIComponent(match[1]);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) {
    signIn(token, { dev: Boolean(sessionStorage.getItem(DEV_KEY)) });
    if (app.threadId) loadThread(app.threadId);
  } else {
    showSignIn();
  }
}

init();
