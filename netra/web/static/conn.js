// The WebSocket side of the page: connect, authenticate, reconnect.
//
// Browsers cannot set headers on a WebSocket, so the token goes in the first
// frame. A close the protocol says not to retry (bad token, abuse, a normal
// close) stops here; any other loss reconnects with exponential backoff and
// full jitter, so a restarted server is not hit by every page at once.
//
// A connection that dropped without a close frame (1006) is resumed: the new
// connection asks for the session it had (PROTOCOL.md, resumable sessions),
// and the runs on screen go on where they were, every event once and in
// order. When the session is gone, the page starts over with the new one.

const NO_RETRY = new Set([1000, 1007, 1009, 4400, 4401]);

// Human wording of the close codes of protocol v1 (PROTOCOL.md, "Close codes").
const CLOSE_TEXT = {
  1000: "The connection was closed.",
  1001: "The server is restarting or shutting down.",
  1006: "The connection to the server was lost.",
  1007: "The server refused a message that was not valid UTF-8.",
  1009: "A message was larger than the server accepts.",
  1011: "The server hit an internal error.",
  4400: "The server closed the connection after repeated malformed messages.",
  4401: "Sign-in failed: the token was refused or has expired. Sign in again with a new token.",
  4408: "Signing in took too long.",
  4429: "Too many connections or messages for this user.",
  4430: "This page fell behind reading the server's events.",
};

export function closeText(code, reason) {
  const text = CLOSE_TEXT[code] || `The connection closed unexpectedly.`;
  return reason ? `${text} (${code}: ${reason})` : `${text} (${code})`;
}

export function shouldReconnect(code) {
  return !NO_RETRY.has(code);
}

export function backoffDelay(attempt, { baseMs = 500, capMs = 30000 } = {}) {
  const ceiling = Math.min(capMs, baseMs * 2 ** attempt);
  return Math.round(ceiling / 2 + Math.random() * ceiling / 2);
}

const PING_EVERY_MS = 25000;
const PONG_WITHIN_MS = 10000;

export class Connection {
  // onEvent(event): every server event; onState({state, ...}): connecting,
  // open, waiting (to reconnect, with delayMs), closed (for good).
  constructor({ url, token, onEvent, onState }) {
    Object.assign(this, { url, token, onEvent, onState });
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.open = false;
    this.stopped = false;
    this.lastSeq = 0;
    this.session = null; // {id, token} of the session to resume after a drop
    this.resuming = null; // the new connection's own `connected` while a resume is asked
    this.onOnline = () => { if (this.timer !== null) this.retryNow(); };
    window.addEventListener("online", this.onOnline);
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    this.onState({ state: "connecting", attempt: this.attempt });
    const ws = (this.ws = new WebSocket(this.url, ["netra.v1"]));
    this.resuming = null;
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: this.token }));
    ws.onmessage = (msg) => this.receive(ws, msg);
    ws.onclose = (ev) => this.closed(ws, ev.code, ev.reason);
  }

  receive(ws, msg) {
    if (ws !== this.ws) return;
    let event;
    try {
      event = JSON.parse(msg.data);
    } catch {
      console.warn("netra: a frame that is not JSON", msg.data);
      return;
    }
    if (event.type === "connected" && this.session && this.canResume) {
      // a new connection after a drop: ask for the session the page had
      this.resuming = event;
      ws.send(JSON.stringify({
        type: "resume", session_id: this.session.id, resume_token: this.session.token, last_seq: this.lastSeq,
      }));
      return;
    }
    if (this.resuming) {
      const own = this.resuming;
      if (event.type === "resumed" || event.type === "resync_required") {
        this.resuming = null;
        if (event.type === "resync_required") this.lastSeq = event.seq;
        this.opened(own, { resumed: event.type === "resumed", resync: event.type === "resync_required" });
        return;
      }
      if (event.type === "error" && !event.ref) {
        // the session is gone: go on with the new connection's own
        this.resuming = null;
        this.lastSeq = event.seq;
        this.adopt(own);
        this.opened(own, { resumed: false });
        return;
      }
    }
    if (event.seq !== this.lastSeq + 1) console.warn(`netra: seq ${this.lastSeq} then ${event.seq}`);
    this.lastSeq = event.seq;
    if (event.type === "connected") {
      this.adopt(event);
      this.opened(event, { resumed: false });
    }
    if (event.type === "pong") clearTimeout(this.pongTimer);
    this.onEvent(event);
  }

  adopt(connected) {
    this.session = connected.resume_token ? { id: connected.session_id, token: connected.resume_token } : null;
  }

  opened(connected, { resumed, resync = false }) {
    this.open = true;
    this.attempt = 0;
    this.keepAlive();
    this.onState({ state: "open", userId: connected.user_id, limits: connected.limits, resumed, resync });
  }

  closed(ws, code, reason) {
    if (ws !== this.ws) return;
    // dropped without a close frame: the session waits for us on the server
    this.canResume = code === 1006 && this.session !== null;
    const wasOpen = this.open;
    this.open = false;
    this.ws = null;
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    if (this.stopped) return;
    if (!shouldReconnect(code)) {
      this.onState({ state: "closed", code, reason, wasOpen });
      return;
    }
    const delayMs = this.canResume && this.attempt === 0 ? 0 : backoffDelay(this.attempt++);
    if (this.canResume && delayMs === 0) this.attempt++;
    this.onState({ state: "waiting", code, reason, wasOpen, delayMs, resuming: this.canResume });
    this.timer = setTimeout(() => this.connect(), delayMs);
  }

  retryNow() {
    if (!this.stopped && this.ws === null) this.connect();
  }

  // A half-open TCP connection can stay silent for minutes; a ping the
  // server must answer notices it, and the close that follows reconnects.
  keepAlive() {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      if (!this.send({ type: "ping", id: `ka-${Date.now()}` })) return;
      clearTimeout(this.pongTimer);
      this.pongTimer = setTimeout(() => this.drop("no answer to ping"), PONG_WITHIN_MS);
    }, PING_EVERY_MS);
  }

  // Give up on the current socket now (a dead peer may never finish a close
  // handshake) and go through the same reconnect path as any other loss.
  drop(reason) {
    const ws = this.ws;
    if (!ws) return;
    ws.onclose = null;
    ws.close();
    this.closed(ws, 1006, reason);
  }

  // False when the message could not be sent (not connected).
  send(message) {
    if (!this.open || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    window.removeEventListener("online", this.onOnline);
    if (this.ws) this.ws.close(1000, "signed out");
    this.ws = null;
    this.open = false;
  }
}
