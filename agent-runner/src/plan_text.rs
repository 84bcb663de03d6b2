//! The words between the runner and the agent: the system text every prompt carries, the plan
//! and build requests, and reading a plan out of the plan agent's answer.

use crate::view::{FeatureContext, PlanInfo, PromptInfo};

/// A plan read from the agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPlan {
    pub summary: String,
    pub steps: Vec<String>,
}

/// The longest summary and step recorded (command-api's limits are higher).
const SUMMARY_MAX: usize = 2000;
const STEP_MAX: usize = 1000;
const STEPS_MAX: usize = 50;

/// Reads `Plan: <summary>` (or the first line) and the numbered or bulleted lines after it.
/// `None` when the answer is empty.
pub fn parse_plan(answer: &str) -> Option<ParsedPlan> {
    let mut summary: Option<String> = None;
    let mut steps = Vec::new();
    for line in answer.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("```") {
            continue;
        }
        if let Some(step) = step_text(line) {
            if steps.len() < STEPS_MAX && !step.is_empty() {
                steps.push(bounded(step, STEP_MAX));
            }
            continue;
        }
        if summary.is_none() {
            let text = line.trim_start_matches('#').trim();
            let text = strip_prefix_ci(text, "plan:").unwrap_or(text).trim();
            let text = text.trim_matches('*').trim();
            if !text.is_empty() {
                summary = Some(bounded(text, SUMMARY_MAX));
            }
        }
    }
    let summary = summary.or_else(|| steps.first().cloned())?;
    Some(ParsedPlan { summary, steps })
}

fn step_text(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix(['-', '*', '•']) {
        return Some(rest.trim());
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && digits < 4 {
        let rest = &line[digits..];
        if let Some(rest) = rest.strip_prefix(['.', ')']) {
            return Some(rest.trim());
        }
    }
    None
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn bounded(text: &str, max: usize) -> String {
    crate::redact::truncate(text, max)
}

/// The system text of every prompt: who is in the session, and what the feature's other
/// sessions learned and decided (the way sessions of one feature inform each other).
pub fn system_text(
    session_title: &str,
    participants: &[(String, String)],
    feature: Option<&FeatureContext>,
) -> String {
    let mut text = format!(
        "You are the coding agent of the Canopy session \"{session_title}\". Several people \
         prompt you together; every plan you propose is reviewed by a person before you may \
         change anything, and tool calls may need a person's approval.\n"
    );
    if !participants.is_empty() {
        text.push_str("Participants:\n");
        for (name, role) in participants {
            text.push_str(&format!("- {name} ({role})\n"));
        }
    }
    if let Some(feature) = feature {
        text.push_str(&format!(
            "This session is part of the feature \"{}\".\n",
            feature.title
        ));
        if !feature.description.trim().is_empty() {
            text.push_str(&format!("Feature description: {}\n", feature.description));
        }
        if !feature.learnings.is_empty() {
            text.push_str("What the feature's sessions have learned:\n");
            for learning in &feature.learnings {
                text.push_str(&format!("- {learning}\n"));
            }
        }
        if !feature.decisions.is_empty() {
            text.push_str("Decisions taken for the feature:\n");
            for decision in &feature.decisions {
                text.push_str(&format!("- {decision}\n"));
            }
        }
    }
    text
}

/// The first plan request for a prompt.
pub fn plan_request(prompt: &PromptInfo) -> String {
    format!(
        "{} asks:\n{}\n\nPropose a plan; do not change anything yet. Answer with a first line \
         `Plan: <one-line summary>` followed by numbered steps.",
        prompt.author_name, prompt.text
    )
}

/// A plan request after a rejection.
pub fn revise_request(prompt: &PromptInfo, rejected: &PlanInfo) -> String {
    let (reviewer, comment) = rejected
        .verdict
        .as_ref()
        .map(|v| {
            (
                v.reviewer_name.as_str(),
                v.comment.as_deref().unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    format!(
        "{reviewer} rejected the plan \"{}\" with this comment:\n{comment}\n\nThe request from {} \
         was:\n{}\n\nPropose a revised plan; do not change anything yet. Answer with a first line \
         `Plan: <one-line summary>` followed by numbered steps.",
        rejected.summary, prompt.author_name, prompt.text
    )
}

/// The build request once a plan is approved.
pub fn build_request(prompt: &PromptInfo, plan: &PlanInfo) -> String {
    let reviewer = plan
        .verdict
        .as_ref()
        .map(|v| v.reviewer_name.as_str())
        .unwrap_or("a reviewer");
    let mut text = format!(
        "{reviewer} approved this plan. Implement it now.\nPlan: {}\n",
        plan.summary
    );
    for (index, step) in plan.steps.iter().enumerate() {
        text.push_str(&format!("{}. {step}\n", index + 1));
    }
    text.push_str(&format!(
        "\nThe original request from {}:\n{}",
        prompt.author_name, prompt.text
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_read_from_common_shapes() {
        let plan = parse_plan(
            "Plan: add a greeting file\n\n1. Write hello.txt\n2) Run `ls -la`\n- check it\n",
        )
        .unwrap();
        assert_eq!(plan.summary, "add a greeting file");
        assert_eq!(plan.steps, ["Write hello.txt", "Run `ls -la`", "check it"]);

        let plan = parse_plan("## **Refactor login**\nSome words.\n* one\n").unwrap();
        assert_eq!(plan.summary, "Refactor login");
        assert_eq!(plan.steps, ["one"]);

        let only_steps = parse_plan("1. do it\n2. check it").unwrap();
        assert_eq!(only_steps.summary, "do it");
        assert!(parse_plan("  \n ").is_none());
        // A year is not a step number.
        assert_eq!(parse_plan("2026. was a year").unwrap().steps.len(), 0);
    }

    #[test]
    fn the_system_text_names_people_and_carries_learnings() {
        let feature = FeatureContext {
            title: "Login".into(),
            description: String::new(),
            learnings: vec!["the tests need TZ=UTC (from Ann)".into()],
            decisions: vec!["Use argon2: safer".into()],
        };
        let text = system_text(
            "Fix login",
            &[("Ann".into(), "member".into())],
            Some(&feature),
        );
        assert!(text.contains("- Ann (member)"));
        assert!(text.contains("the tests need TZ=UTC"));
        assert!(text.contains("Use argon2: safer"));
    }
}
