// Tool calls that wait for the user's approval: a card in the run's steps
// with the call and its arguments, Approve and Deny (the arguments may be
// edited first, a denial may say why), and then what became of the call.
// Kept apart from view.js: a run's view only lends its list of steps.
// Like everything on the page, what the server sent goes in as text.

import { el, errorText } from "./view.js";

// A decision's message id -> its card, until the call moved on or the
// server refused the decision.
const sent = new Map();
// RunView -> (tool call id -> card) of the calls still waiting there.
const waiting = new WeakMap();

// The failed results a refused call gives (docs/protocol.md, tool_decision).
const REFUSED = /^(the user declined this call|not approved: )/;

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

function json(value) {
  return JSON.stringify(value);
}

class ApprovalCard {
  // call: run_id, tool_call_id, tool, args and expires_at_ms (an
  // approval_required event, or a stored approval read back).
  constructor(call, send) {
    this.call = call;
    this.send = send;
    this.outcome = el("p", { class: "approval-outcome", role: "status" });
    this.argsBox = el("textarea", {
      class: "approval-args", rows: 3, spellcheck: false, "aria-label": `Arguments for ${call.tool}`,
    });
    this.argsBox.value = JSON.stringify(call.args, null, 2);
    this.reason = el("input", {
      type: "text", class: "approval-reason", placeholder: "Reason (optional)", "aria-label": "Reason to deny",
      maxLength: 1000,
    });
    this.approveButton = el("button", { type: "button", class: "approve", text: "Approve" });
    this.denyButton = el("button", { type: "button", class: "danger deny", text: "Deny" });
    this.approveButton.addEventListener("click", () => this.decide("approve"));
    this.denyButton.addEventListener("click", () => this.decide("deny"));
    this.actions = el("div", { class: "approval-actions" },
      this.approveButton, this.denyButton, this.reason,
      el("details", { class: "approval-edit" }, el("summary", { text: "Edit arguments" }), this.argsBox));
    const until = call.expires_at_ms ? new Date(call.expires_at_ms).toLocaleTimeString() : null;
    this.node = el("li", { class: "approval", "data-state": "pending", "data-call": call.tool_call_id },
      el("span", { class: "label", text: `⚙ ${call.tool}` }), " asks for your approval ",
      el("code", { class: "args", text: json(call.args) }),
      until ? el("small", { class: "expires", text: ` (until ${until})` }) : null,
      this.actions, this.outcome);
  }

  decide(decision) {
    const message = {
      type: "tool_decision", id: newId(), run_id: this.call.run_id,
      tool_call_id: this.call.tool_call_id, decision,
    };
    if (decision === "approve") {
      let args;
      try {
        args = JSON.parse(this.argsBox.value);
      } catch (err) {
        return this.say(`The edited arguments are not JSON: ${err.message}`, "problem");
      }
      if (args === null || typeof args !== "object" || Array.isArray(args)) {
        return this.say("The edited arguments must be a JSON object.", "problem");
      }
      if (json(args) !== json(this.call.args)) message.args = args;
    } else if (this.reason.value.trim()) {
      message.reason = this.reason.value.trim();
    }
    if (!this.send(message)) return this.say("Not connected: nothing was sent. Try again once connected.", "problem");
    sent.set(message.id, this);
    this.decided = message;
    this.enable(false);
    this.node.dataset.state = "sent";
    this.say(decision === "approve" ? "Approving…" : "Denying…");
  }

  enable(on) {
    for (const input of [this.approveButton, this.denyButton, this.reason, this.argsBox]) input.disabled = !on;
  }

  say(text, kind = "") {
    this.outcome.textContent = text;
    this.outcome.dataset.kind = kind;
  }

  // The server refused the decision: arguments that do not fit leave the
  // call waiting (try again); anything else means it no longer waits.
  refused(event) {
    this.decided = null;
    if (event.code === "bad_request") {
      this.node.dataset.state = "pending";
      this.enable(true);
      return this.say(`Refused — ${errorText(event)}`, "problem");
    }
    this.settle("closed", `This call no longer waits for a decision — ${errorText(event)}`);
  }

  settle(state, text) {
    for (const [id, card] of sent) if (card === this) sent.delete(id);
    this.node.dataset.state = state;
    this.actions.remove();
    this.say(text, state === "approved" ? "" : "problem");
  }
}

// Follow one run event for the approvals of its view: a card for each
// approval_required, settled by the call's tool_completed (how it went) or
// by the run's end. `send(message)` sends on the connection (false: offline).
export function trackApproval(view, event, send) {
  let cards = waiting.get(view);
  if (event.type === "approval_required") {
    if (!cards) waiting.set(view, (cards = new Map()));
    const card = new ApprovalCard(event, send);
    cards.set(event.tool_call_id, card);
    view.step(card.node);
    view.setState("waiting", `waiting for your approval of ${event.tool}…`);
    return;
  }
  if (!cards) return;
  const card = cards.get(event.tool_call_id);
  if (event.type === "tool_executing" && card) {
    card.ranWith = event.args;
  } else if (event.type === "tool_completed" && card) {
    cards.delete(event.tool_call_id);
    if (typeof event.error === "string" && REFUSED.test(event.error)) card.settle("denied", `Denied: ${event.error}.`);
    else card.settle("approved", json(card.ranWith ?? card.call.args) === json(card.call.args)
      ? "Approved." : `Approved with edited arguments ${json(card.ranWith)}.`);
  } else if (view.finished) {
    for (const pending of cards.values()) pending.settle("closed", "No longer waiting: the run ended.");
    waiting.delete(view);
  }
}

// An `error` answering a decision of this page: shown on its card. True
// when it was one.
export function approvalRefused(event) {
  const card = event.ref ? sent.get(event.ref) : undefined;
  if (!card) return false;
  sent.delete(event.ref);
  card.refused(event);
  return true;
}

// The approvals of a run read back from the threads API. One still pending
// (its run waits, perhaps on another connection or device) can be decided
// from here; the run's events then go to the connection that started it.
export function historyApprovals(view, run, send) {
  for (const approval of (run && run.approvals) || []) {
    const card = new ApprovalCard(approval, send);
    card.node.querySelector(".expires")?.remove();
    const call = view.tools.get(approval.tool_call_id); // the call it let run, or refused
    if (call) call.node.before(card.node);
    else view.step(card.node);
    if (approval.status === "pending" && run.status === "running") {
      const decide = card.decide.bind(card);
      card.decide = (decision) => {
        decide(decision);
        if (card.decided) card.say("Decision sent: the run goes on where it started.");
      };
      continue;
    }
    const edited = approval.edited_args ? ` with edited arguments ${json(approval.edited_args)}` : "";
    const reason = approval.reason ? `: ${approval.reason}` : "";
    switch (approval.status) {
      case "approved": card.settle("approved", `Approved${edited}.`); break;
      case "denied": card.settle("denied", `Denied${reason}.`); break;
      default: card.settle("closed", "Not decided: the run ended while it waited.");
    }
  }
}
