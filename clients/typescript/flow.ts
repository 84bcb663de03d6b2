// The multiplayer flow a frontend runs, typed by the client generated from Canopy's OpenAPI
// documents (openapi-typescript + openapi-fetch): Ann starts a session, Bo joins, both prompt;
// the runner proposes a plan per prompt, which Ada (admin) approves, and asks before its tool
// runs, which Ada grants; the session's live stream (SSE) shows every step. scripts/contract.sh
// runs it against `canopy up` (the runner with the built-in scripted demo model).
import createClient from "openapi-fetch";
import type { paths as CommandPaths } from "./generated/command-api.js";
import type { paths as QueryPaths, components as QueryComponents } from "./generated/query-api.js";

type Session = QueryComponents["schemas"]["Session"];

/** A live event's data (the relay's envelope; its schema is in openapi/live.asyncapi.json). */
interface LiveEvent {
  type: string;
  sequence: number;
  data: Record<string, unknown>;
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const STEP_TIMEOUT_MS = 240_000;
const commands = createClient<CommandPaths>({ baseUrl: env("CANOPY_COMMAND_API_URL") });
const queries = createClient<QueryPaths>({ baseUrl: env("CANOPY_QUERY_API_URL") });
const people = {
  ann: env("CANOPY_FLOW_ANN"),
  bo: env("CANOPY_FLOW_BO"),
  ada: env("CANOPY_FLOW_ADA"),
};
const bearer = (token: string) => ({ Authorization: `Bearer ${token}` });

function ok<T>(step: string, answer: { data?: T; error?: unknown; response: Response }): T {
  if (answer.data === undefined) {
    throw new Error(`${step}: ${answer.response.status} ${JSON.stringify(answer.error)}`);
  }
  console.log(`> ${step}: ${answer.response.status}`);
  return answer.data;
}

/** The session's live events, parsed from its SSE stream (history first, then live). */
async function* follow(session: string, token: string): AsyncGenerator<LiveEvent> {
  const answer = await queries.GET("/sessions/{session_id}/stream", {
    params: { path: { session_id: session } },
    headers: bearer(token),
    parseAs: "stream",
  });
  const body = answer.response.body;
  if (!answer.response.ok || body === null) {
    throw new Error(`the live stream answered ${answer.response.status}`);
  }
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
    buffer += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (name !== "message" || data.length === 0) continue;
      yield JSON.parse(data.join("\n")) as LiveEvent;
    }
  }
}

async function main(): Promise<void> {
  const started = ok(
    "Ann POST /sessions",
    await commands.POST("/sessions", {
      headers: bearer(people.ann),
      body: {
        title: "TypeScript flow",
        repository_url: env("CANOPY_FLOW_REPOSITORY"),
        base_branch: "main",
      },
    }),
  );
  const session = started.aggregate_id;
  console.log(`started session ${session}`);
  const events = follow(session, people.ann);
  const path = { session_id: session };

  ok(
    "Bo POST /sessions/{id}/join",
    await commands.POST("/sessions/{session_id}/join", {
      params: { path },
      headers: bearer(people.bo),
      body: {},
    }),
  );
  for (const [who, token, text] of [
    ["Ann", people.ann, "Add a short note about this flow"],
    ["Bo", people.bo, "Then list what is in the repository"],
  ] as const) {
    ok(
      `${who} POST /sessions/{id}/prompts`,
      await commands.POST("/sessions/{session_id}/prompts", {
        params: { path },
        headers: bearer(token),
        body: { text },
      }),
    );
  }

  const seen: string[] = [];
  let completed = 0;
  const deadline = Date.now() + 2 * STEP_TIMEOUT_MS;
  const timer = setTimeout(() => {
    console.error(`timed out; the live stream showed: ${seen.join(", ")}`);
    process.exit(1);
  }, 2 * STEP_TIMEOUT_MS);
  for await (const event of events) {
    seen.push(event.type);
    console.log(`  live #${event.sequence} ${event.type}`);
    if (event.type === "PromptFailed") {
      throw new Error(`a prompt failed: ${JSON.stringify(event.data)}`);
    }
    if (event.type === "PlanProposed") {
      const plan_id = String(event.data["plan_id"]);
      ok(
        "Ada POST /sessions/{id}/plans/{plan}/approve",
        await commands.POST("/sessions/{session_id}/plans/{plan_id}/approve", {
          params: { path: { session_id: session, plan_id } },
          headers: bearer(people.ada),
          body: {},
        }),
      );
    }
    if (event.type === "ToolApprovalRequested") {
      const request_id = String(event.data["request_id"]);
      ok(
        "Ada POST /sessions/{id}/tool-approvals/{request}/grant",
        await commands.POST("/sessions/{session_id}/tool-approvals/{request_id}/grant", {
          params: { path: { session_id: session, request_id } },
          headers: bearer(people.ada),
          body: {},
        }),
      );
    }
    if (event.type === "PromptCompleted" && ++completed === 2) break;
    if (Date.now() > deadline) break;
  }
  clearTimeout(timer);
  for (const step of ["SessionStarted", "PlanProposed", "PlanApproved", "ToolApprovalGranted", "CheckpointTaken"]) {
    if (!seen.includes(step)) throw new Error(`the live stream showed no ${step}: ${seen.join(", ")}`);
  }
  if (completed !== 2) throw new Error(`${completed} of 2 prompts completed: ${seen.join(", ")}`);

  // The read side caught up: the session as a frontend lists it, typed by query-api's document.
  let read: Session | undefined;
  for (const until = Date.now() + 30_000; Date.now() < until; ) {
    const answer = await queries.GET("/sessions/{session_id}", { params: { path }, headers: bearer(people.bo) });
    read = answer.data;
    if (read !== undefined && read.prompt_count === 2 && read.participant_count === 2) break;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  if (read === undefined || read.prompt_count !== 2 || read.participant_count !== 2) {
    throw new Error(`query-api's session: ${JSON.stringify(read)}`);
  }
  console.log(`query-api: session ${read.status}, ${read.prompt_count} prompts, ${read.checkpoint_count} checkpoints`);
  console.log("flow: done");
  process.exit(0);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
