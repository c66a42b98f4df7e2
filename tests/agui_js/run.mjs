// Drives netra's POST /agui with the official AG-UI client (@ag-ui/client's
// HttpAgent), the way a CopilotKit-style front end does, and prints what the
// client parsed as one JSON object on stdout, for tests/test_agui_client.py.
//
//   node run.mjs <scenario> <url of /agui> <bearer token> <user text>...
//
// Scenarios: "run" (one run per text, all on one agent and so one thread),
// "abort" (abortRun() once the first tool call has ended), "approve" (one
// run per text; a run that ends at an interrupt is resumed at once, each
// open interrupt answered as the next RESPONSES entry says: a JSON list of
// the client's responses, in the environment, default: approve all).
import { HttpAgent, buildResumeArray } from "@ag-ui/client";

const [scenario, url, token, ...texts] = process.argv.slice(2);
const responses = JSON.parse(process.env.RESPONSES ?? "[]");

const agent = new HttpAgent({ url, headers: { Authorization: `Bearer ${token}` } });
const runs = [];

async function run(parameters) {
  const events = [];
  let error = null;
  let result = null;
  let finished = null;
  const subscriber = {
    onEvent({ event }) {
      events.push(event);
      if (scenario === "abort" && event.type === "TOOL_CALL_END") {
        agent.abortRun();
      }
    },
    onRunFinishedEvent({ outcome, interrupts }) {
      finished = { outcome, interrupts: interrupts ?? null };
    },
  };
  try {
    result = await agent.runAgent(parameters, subscriber);
  } catch (err) {
    error = { message: String(err?.message ?? err), status: err?.status ?? null, payload: err?.payload ?? null };
  }
  runs.push({
    events, error, finished, newMessages: result?.newMessages ?? null,
    pendingInterrupts: structuredClone(agent.pendingInterrupts),
  });
}

for (const [i, text] of texts.entries()) {
  agent.addMessage({ id: `user-${i}-${Date.now()}`, role: "user", content: text });
  await run({});
  // a front end shows each interrupt and resumes with the user's answers
  while (scenario === "approve" && agent.pendingInterrupts.length > 0 && runs.at(-1).error === null) {
    const answers = {};
    for (const interrupt of agent.pendingInterrupts) {
      answers[interrupt.id] = responses.shift() ?? { status: "resolved", payload: { approve: true } };
    }
    await run({ resume: buildResumeArray(agent.pendingInterrupts, answers) });
  }
}

process.stdout.write(JSON.stringify({ threadId: agent.threadId, runs, messages: agent.messages }));
