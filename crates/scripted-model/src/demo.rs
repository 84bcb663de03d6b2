//! The built-in demo model: a stateless script that plays a plausible agent for OpenCode
//! 1.18.33.
//!
//! It keeps no state of its own: every answer is decided from the request alone (its agent, its
//! last user message and what followed it), so one server answers any number of sessions and
//! prompts, concurrently, for as long as it runs. A plan-agent turn gets a plan as text; a
//! build-agent turn writes [`DEMO_FILE`], then lists the workspace with bash, then says
//! [`DEMO_DONE`].

use serde_json::json;

use crate::server::{RecordedRequest, Script, Step};

/// The file a build turn of the demo model writes, relative to the project directory.
pub const DEMO_FILE: &str = "canopy-demo.txt";

/// The demo model's last words in a build turn, after the bash result.
pub const DEMO_DONE: &str = "Done: wrote canopy-demo.txt and listed the workspace.";

/// The demo model's answer to anything it has no rule for.
pub const DEMO_FALLBACK: &str = "This is Canopy's built-in demo model: it can only write a note \
    and list the workspace. Configure a real model to do real work.";

/// How many characters of the request the plan's summary quotes.
const QUOTED_CHARS: usize = 60;

/// The demo agent, as rules over the request (in this order):
///
/// 1. OpenCode's title request: the canned [`crate::SCRIPTED_TITLE`];
/// 2. a plan-agent request with no tool result since the last user message: the plan, as text
///    (`Plan: …` quoting the first 60 characters of the request, then numbered steps);
/// 3. any other request with no tool result since the last user message (a build turn
///    starting): a `write` call creating [`DEMO_FILE`] with a note about the request;
/// 4. the last message is the `write` result: a `bash` call running `ls -la`;
/// 5. the last message is the `bash` result: [`DEMO_DONE`];
/// 6. anything else: [`DEMO_FALLBACK`].
pub fn demo_script() -> Script {
    Script::new()
        .on_with(
            "plan",
            |request| request.is_plan_request() && starts_turn(request),
            |request| Step::text(plan(&request.last_user_request())),
        )
        .on_with(
            "write",
            |request| starts_turn(request) && offers(request, "write"),
            |request| {
                Step::tool(
                    "write",
                    json!({ "filePath": DEMO_FILE, "content": note(&request.last_user_request()) }),
                )
            },
        )
        .on(
            "bash",
            |request| {
                request.last_tool_name().as_deref() == Some("write") && offers(request, "bash")
            },
            Step::tool(
                "bash",
                json!({ "command": "ls -la", "description": "List the workspace" }),
            ),
        )
        .on(
            "done",
            |request| request.last_tool_name().as_deref() == Some("bash"),
            Step::text(DEMO_DONE),
        )
        .then_always(Step::text(DEMO_FALLBACK))
}

/// Nothing has run yet in this turn: no tool result since the last user message.
fn starts_turn(request: &RecordedRequest) -> bool {
    request.tool_results_since_last_user().is_empty()
}

/// A tool call only makes sense when the request offers that tool.
fn offers(request: &RecordedRequest, tool: &str) -> bool {
    request.tool_names().iter().any(|name| name == tool)
}

/// The plan, in the shape the runner parses: a `Plan:` summary line, then numbered steps.
fn plan(asked: &str) -> String {
    format!(
        "Plan: write a note about \"{}\" and list the workspace\n\
         1. Write {DEMO_FILE} with a note about the request\n\
         2. Run `ls -la` to check the workspace",
        excerpt(the_request(asked))
    )
}

/// The person's own words when the request frames them (`<name> asks:` on the first line, then
/// the text, then instructions after a blank line, as Canopy's runner sends them).
fn the_request(asked: &str) -> &str {
    match asked.split_once('\n') {
        Some((first, rest)) if first.trim_end().ends_with("asks:") => {
            rest.split("\n\n").next().unwrap_or(rest).trim()
        }
        _ => asked,
    }
}

/// The first [`QUOTED_CHARS`] characters of `asked` on one line, with `...` when cut.
fn excerpt(asked: &str) -> String {
    let one_line = |c: char| if c.is_control() { ' ' } else { c };
    let mut quoted: String = asked.chars().take(QUOTED_CHARS).map(one_line).collect();
    if asked.chars().nth(QUOTED_CHARS).is_some() {
        quoted.push_str("...");
    }
    quoted
}

/// What the build turn writes into [`DEMO_FILE`].
fn note(asked: &str) -> String {
    format!(
        "This note was written by Canopy's built-in demo model, which stands in for a real \
         model until one is configured.\n\nYou asked:\n\n{asked}\n"
    )
}

#[cfg(test)]
mod framing {
    use super::*;

    #[test]
    fn the_runners_framing_is_not_quoted() {
        assert_eq!(
            the_request("Ann asks:\nAdd a note\n\nPropose a plan; do not change anything yet."),
            "Add a note"
        );
        assert_eq!(the_request("Add a note\nmore"), "Add a note\nmore");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::server::{Answer, SCRIPTED_TITLE};

    const PLAN_REMINDER: &str = "<system-reminder>\n# Plan Mode - System Reminder\n\nCRITICAL: \
        Plan mode ACTIVE - you are in READ-ONLY phase. STRICTLY FORBIDDEN:\nANY file edits.\n\
        </system-reminder>\n";
    const BUILD_REMINDER: &str = "<system-reminder>\nYour operational mode has changed from \
        plan to build.\nYou are no longer in read-only mode.\n</system-reminder>\n";

    /// A request body as OpenCode sends it: its system prompt, the 11 tools (three here), then
    /// `messages`.
    fn body(messages: Vec<Value>) -> Value {
        let mut all = vec![json!({ "role": "system", "content": "You are opencode, a CLI tool." })];
        all.extend(messages);
        let tools: Vec<Value> = ["bash", "read", "write"]
            .iter()
            .map(|name| json!({ "type": "function", "function": { "name": name, "parameters": {} } }))
            .collect();
        json!({ "model": "scripted", "stream": true, "messages": all, "tools": tools })
    }

    fn user(text: &str) -> Value {
        json!({ "role": "user", "content": text })
    }

    fn user_parts(parts: &[&str]) -> Value {
        let parts: Vec<Value> = parts
            .iter()
            .map(|text| json!({ "type": "text", "text": text }))
            .collect();
        json!({ "role": "user", "content": parts })
    }

    fn call(id: &str, name: &str, arguments: Value) -> Value {
        json!({ "role": "assistant", "content": "", "tool_calls": [{
            "id": id, "type": "function",
            "function": { "name": name, "arguments": arguments.to_string() },
        }] })
    }

    fn result(id: &str, content: &str) -> Value {
        json!({ "role": "tool", "tool_call_id": id, "content": content })
    }

    fn request(body: Value) -> RecordedRequest {
        RecordedRequest {
            index: 0,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            headers: Vec::new(),
            body,
            answer: Answer::Step,
        }
    }

    /// Which rule answers `body`, and with what.
    fn answer(body: Value) -> (Answer, Step) {
        demo_script().answer(&request(body))
    }

    fn rule(name: &str) -> Answer {
        Answer::Rule(name.into())
    }

    #[test]
    fn a_title_request_gets_the_canned_title() {
        let body = json!({
            "model": "scripted", "stream": true,
            "messages": [
                { "role": "system", "content": "You are a title generator. You output ONLY a thread title." },
                { "role": "user", "content": "Generate a title for this conversation:\n" },
                { "role": "user", "content": "Add a greeting" },
            ],
        });
        assert_eq!(answer(body), (rule("title"), Step::text(SCRIPTED_TITLE)));
    }

    #[test]
    fn a_plan_request_gets_a_plan_quoting_the_request() {
        let asked = "Add a friendly greeting to the README and explain why it matters to new \
                     contributors";
        let (answered, step) = answer(body(vec![user_parts(&[asked, PLAN_REMINDER])]));
        assert_eq!(answered, rule("plan"));
        let Step::Text(text) = step else {
            panic!("a plan is text: {step:?}")
        };
        let first_60: String = asked.chars().take(60).collect();
        assert_eq!(
            text,
            format!(
                "Plan: write a note about \"{first_60}...\" and list the workspace\n\
                 1. Write canopy-demo.txt with a note about the request\n\
                 2. Run `ls -la` to check the workspace"
            )
        );
    }

    #[test]
    fn a_short_multi_line_request_is_quoted_whole_on_one_line() {
        let (_, step) = answer(body(vec![user_parts(&["Fix\nit", PLAN_REMINDER])]));
        let Step::Text(text) = step else {
            panic!("a plan is text: {step:?}")
        };
        assert_eq!(
            text.lines().next(),
            Some("Plan: write a note about \"Fix it\" and list the workspace")
        );
    }

    #[test]
    fn a_build_request_writes_the_demo_file_about_the_request() {
        let (answered, step) = answer(body(vec![user("Add a greeting")]));
        assert_eq!(answered, rule("write"));
        let Step::ToolCalls(calls) = step else {
            panic!("a build turn starts with a tool call: {step:?}")
        };
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "write");
        assert_eq!(calls[0].arguments["filePath"], DEMO_FILE);
        let content = calls[0].arguments["content"].as_str().unwrap();
        assert!(content.contains("Add a greeting"), "{content}");
        assert_eq!(
            calls[0].arguments.as_object().unwrap().len(),
            2,
            "write takes filePath and content only"
        );
    }

    #[test]
    fn a_build_turn_after_a_plan_turn_writes_and_quotes_only_the_new_request() {
        let (answered, step) = answer(body(vec![
            user("Plan a greeting"),
            json!({ "role": "assistant", "content": "Plan: write a note ..." }),
            user_parts(&["Go ahead", BUILD_REMINDER]),
        ]));
        assert_eq!(answered, rule("write"));
        let Step::ToolCalls(calls) = step else {
            panic!("{step:?}")
        };
        let content = calls[0].arguments["content"].as_str().unwrap();
        assert!(content.contains("Go ahead"), "{content}");
        assert!(!content.contains("system-reminder") && !content.contains("Plan a greeting"));
    }

    #[test]
    fn the_write_result_leads_to_bash_and_the_bash_result_to_done() {
        let write = call(
            "call_1",
            "write",
            json!({ "filePath": DEMO_FILE, "content": "x" }),
        );
        let after_write = vec![
            user("Add a greeting"),
            write.clone(),
            result("call_1", "Wrote file successfully."),
        ];
        assert_eq!(
            answer(body(after_write.clone())),
            (
                rule("bash"),
                Step::tool(
                    "bash",
                    json!({ "command": "ls -la", "description": "List the workspace" })
                )
            )
        );

        let mut after_bash = after_write;
        after_bash.push(call(
            "call_2",
            "bash",
            json!({ "command": "ls -la", "description": "List the workspace" }),
        ));
        after_bash.push(result("call_2", "canopy-demo.txt\n"));
        assert_eq!(
            answer(body(after_bash)),
            (rule("done"), Step::text(DEMO_DONE))
        );
    }

    #[test]
    fn a_plan_turn_with_tool_results_and_anything_else_fall_back() {
        // A plan turn in which something ran (another tool): not a fresh plan.
        let read = call("call_1", "read", json!({ "filePath": "README.md" }));
        let planned = body(vec![
            user_parts(&["Plan it", PLAN_REMINDER]),
            read,
            result("call_1", "# readme"),
        ]);
        assert_eq!(
            answer(planned),
            (Answer::Fallback, Step::text(DEMO_FALLBACK))
        );
        // The step limit's assistant message after the bash result.
        let limited = body(vec![
            user("Add a greeting"),
            call("call_2", "bash", json!({ "command": "ls -la" })),
            result("call_2", "a\n"),
            json!({ "role": "assistant", "content": "CRITICAL - MAXIMUM STEPS REACHED" }),
        ]);
        assert_eq!(answer(limited).0, Answer::Fallback);
        // No tools offered: nothing to call.
        let mut bare = body(vec![user("hello")]);
        bare["tools"] = json!([]);
        assert_eq!(answer(bare).0, Answer::Fallback);
    }

    #[test]
    fn the_script_is_stateless() {
        let mut script = demo_script();
        for _ in 0..3 {
            let (answered, _) = script.answer(&request(body(vec![user("again")])));
            assert_eq!(answered, rule("write"));
        }
    }

    #[test]
    fn requests_expose_the_turn_they_belong_to() {
        let request = request(body(vec![
            user("old"),
            call("call_0", "bash", json!({ "command": "true" })),
            result("call_0", "old result"),
            user_parts(&["new", "more", PLAN_REMINDER]),
            call("call_1", "read", json!({ "filePath": "a" })),
            result("call_1", "new result"),
        ]));
        assert!(request.is_plan_request());
        assert_eq!(request.last_user_request(), "new\nmore");
        assert_eq!(request.messages_since_last_user().len(), 2);
        assert_eq!(request.tool_results_since_last_user(), ["new result"]);
        assert_eq!(request.tool_results(), ["old result", "new result"]);
        assert_eq!(request.last_tool_name().as_deref(), Some("read"));

        // A plan reminder typed by the person is not a plan turn; only reminders count.
        let typed = super::tests::request(body(vec![user("Plan mode ACTIVE please")]));
        assert!(!typed.is_plan_request());
        assert_eq!(typed.last_tool_name(), None);
    }
}
