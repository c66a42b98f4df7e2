// Drives netra's POST /agui with the official AG-UI client (@ag-ui/client's
// HttpAgent), the way a CopilotKit-style front end does, and prints what the
// client parsed as one JSON object on stdout, for tests/test_agui_client.py.
//
//   node run.mjs <scenario> <url of /agui> <bearer token> <user text>...
//
// Scenarios: "run" (one run per text, all on one agent and so one thread),
// "abort" (abortRun() once the first tool call has ended).
import { HttpAgent } from "@ag-ui/client";

const [scenario, url, token, ...texts] = process.argv.slice(2);

const agent = new HttpAgent({ url, headers: { Authorization: `Bearer ${token}` } });
const runs = [];

for (const [i, text] of texts.entries()) {
  const events = [];
  let error = null;
  let result = null;
  agent.addMessage({ id: `user-${i}-${Date.now()}`, role: "user", content: text });
  const subscriber = {
    onEvent({ event }) {
      events.push(event);
      if (scenario === "abort" && event.type === "TOOL_CALL_END") {
        agent.abortRun();
      }
    },
  };
  try {
    result = await agent.runAgent({}, subscriber);
  } catch (err) {
    error = { message: String(err?.message ?? err), status: err?.status ?? null, payload: err?.payload ?? null };
  }
  runs.push({ events, error, newMessages: result?.newMessages ?? null });
}

process.stdout.write(JSON.stringify({ threadId: agent.threadId, runs, messages: agent.messages }));
