// Rendering of the conversation. Everything the server or a user wrote goes
// in through textContent, never innerHTML, so no message can become markup;
// the one exception is an assistant's answer, rendered as sanitized markdown
// by markdown.js.

import { MarkdownView } from "./markdown.js";

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function compact(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 300 ? `${text.slice(0, 300)}…` : text;
}

const ERROR_TEXT = {
  busy: "The server is at capacity.",
  rate_limited: "Too many messages; slow down.",
  run_in_progress: "This conversation already has a run in progress.",
  timeout: "The run took too long.",
  llm_error: "The language model failed.",
  tool_error: "A tool failed.",
  store_error: "The server could not reach its database.",
  unauthorized: "Not authorised.",
  forbidden: "Not allowed.",
  not_found: "Not found.",
  too_large: "The message is too large.",
  bad_request: "The server did not understand the message.",
  internal: "The server hit an internal error.",
};

// "busy: The server is at capacity. (capacity is full; retry in 1 s)"
export function errorText(event) {
  const lead = ERROR_TEXT[event.code] || "Error.";
  const retry = event.retry_after_ms ? `; try again in ${Math.ceil(event.retry_after_ms / 1000)} s` : "";
  return `${event.code}: ${lead} ${event.message || ""}${retry}`.trim();
}

const CANCEL_TEXT = {
  client: "Stopped.",
  interrupted: "Interrupted by a newer message.",
  disconnect: "Stopped: the connection was lost.",
  shutdown: "Stopped: the server shut down.",
  timeout: "Stopped: the run took too long.",
};

export function userTurn(text) {
  return el("li", { class: "turn user" }, el("p", { class: "who", text: "You" }), el("p", { class: "text", text }));
}

// One assistant turn: its progress (thinking, tool calls) and its answer.
export class RunView {
  constructor() {
    this.runId = null;
    this.finished = false;
    this.tools = new Map();
    this.state = el("span", { class: "state", text: "sending…" });
    this.agent = el("span", { class: "agent", text: "assistant" });
    this.steps = el("ol", { class: "steps" });
    this.progress = el("details", { class: "progress", open: true },
      el("summary", { text: "Progress" }), this.steps);
    this.progress.hidden = true;
    this.answer = el("div", { class: "answer", "aria-live": "polite", "aria-busy": "true" });
    this.markdown = new MarkdownView(this.answer);
    this.outcome = el("p", { class: "outcome" });
    this.outcome.hidden = true;
    this.node = el("li", { class: "turn assistant", "data-state": "pending" },
      el("p", { class: "who" }, this.agent, " ", this.state), this.progress, this.answer, this.outcome);
  }

  setState(name, text) {
    this.node.dataset.state = name;
    this.state.textContent = text;
  }

  step(node) {
    this.progress.hidden = false;
    this.steps.append(node);
    return node;
  }

  queued(position) {
    this.setState("queued", `waiting (position ${position})…`);
  }

  started(event) {
    this.runId = event.run_id;
    this.node.dataset.runId = event.run_id;
    this.agent.textContent = event.agent;
    this.setState("running", "working…");
  }

  thinking(event) {
    this.agent.textContent = event.agent;
    this.setState("running", `thinking (step ${event.step})…`);
    this.step(el("li", { class: "thinking" },
      el("span", { class: "label", text: `Step ${event.step}` }), " ", event.text || "thinking…"));
  }

  toolExecuting(event) {
    this.setState("running", `calling ${event.tool}…`);
    const outcome = el("span", { class: "tool-outcome", text: "running…" });
    const node = this.step(el("li", { class: "tool", "data-state": "running" },
      el("span", { class: "label", text: `⚙ ${event.tool}` }), " ",
      el("code", { class: "args", text: compact(event.args) }), " ", outcome));
    this.tools.set(event.tool_call_id, { node, outcome });
  }

  toolCompleted(event) {
    let entry = this.tools.get(event.tool_call_id);
    if (!entry) {
      this.toolExecuting({ ...event, args: {} });
      entry = this.tools.get(event.tool_call_id);
    }
    this.showToolOutcome(entry, event);
  }

  showToolOutcome({ node, outcome }, call) {
    const failed = call.error !== undefined && call.error !== null;
    node.dataset.state = failed ? "failed" : "done";
    outcome.textContent = failed
      ? `✗ ${compact(call.error)} · ${call.duration_ms} ms`
      : `→ ${compact(call.result)} · ${call.duration_ms} ms`;
  }

  delta(event) {
    this.setState("running", "answering…");
    this.markdown.append(event.delta); // rendered at the next animation frame
  }

  end(name, text, detail) {
    this.finished = true;
    this.markdown.flush();
    this.answer.setAttribute("aria-busy", "false");
    this.setState(name, text);
    if (detail) {
      this.outcome.textContent = detail;
      this.outcome.hidden = false;
    }
  }

  completed(event) {
    this.markdown.set(event.text); // the whole answer is authoritative
    this.end("completed", `done in ${event.duration_ms} ms`);
  }

  failed(event) {
    const retry = event.retryable ? " You can try again." : "";
    this.end("failed", "failed", `Error ${errorText(event)}${retry}`);
  }

  cancelled(event) {
    this.end("cancelled", "cancelled", `${CANCEL_TEXT[event.reason] || "Stopped."} (agent_cancelled: ${event.reason})`);
  }

  refused(event) {
    this.end("refused", "not started", `Refused — ${errorText(event)}`);
  }

  interrupted(text) {
    if (!this.finished) this.end("interrupted", "interrupted", text);
  }

  // A turn read back from the threads API (message + its run record).
  static fromHistory(message, run) {
    const view = new RunView();
    view.runId = message.run_id;
    view.markdown.set(message.text);
    if (run) {
      view.agent.textContent = run.agent;
      for (const call of run.tool_calls || []) {
        view.toolExecuting({ tool_call_id: call.id, tool: call.name, args: call.args });
        view.showToolOutcome(view.tools.get(call.id), call);
      }
    }
    const status = run ? run.status : "completed";
    if (status === "completed") view.end("completed", run && run.duration_ms != null ? `done in ${run.duration_ms} ms` : "done");
    else if (status === "cancelled") view.cancelled({ reason: run.cancel_reason || "client" });
    else if (status === "failed") view.end("failed", "failed", `Error ${run.error_code || "internal"}`);
    else view.end("interrupted", "unfinished", "This run had not finished when the conversation was loaded.");
    return view;
  }
}

export function threadItem(thread, current, onSelect) {
  const when = new Date(thread.updated_at * 1000).toLocaleString();
  const button = el("button", { type: "button", class: "thread", "data-id": thread.id },
    el("span", { class: "title", text: thread.title || "Untitled" }),
    el("small", { text: when }));
  if (thread.id === current) button.setAttribute("aria-current", "true");
  button.addEventListener("click", () => onSelect(thread.id));
  return el("li", {}, button);
}
