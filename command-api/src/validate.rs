//! Field checks on request bodies: sizes, formats and required values, collected so that one
//! answer lists every invalid field. The domain still enforces its own rules; these are the
//! edge's limits on what it accepts at all.
//!
//! Each text field has one [`Rule`]: its length in characters and its pattern. The server checks
//! a value with exactly that rule and the OpenAPI document publishes exactly that rule
//! ([`Rule::schema`]), so the two cannot disagree. The patterns use only what ECMA-262, Python
//! and Rust regexes read alike: anchors, classes with explicit ranges, groups and counted
//! repetition (no `\s`, no lookaround).

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use regex::Regex;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};

use crate::error::{ApiError, FieldError};

/// Size limits from configuration.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_bytes: usize,
}

/// The most entries a list field holds.
pub(crate) const LIST: usize = 1000;

/// A rule on a text field: what the server accepts, and what the document says it accepts.
#[derive(Debug)]
pub(crate) struct Rule {
    /// Length bounds, in characters (Unicode scalar values, as JSON Schema counts).
    pub(crate) min: usize,
    pub(crate) max: usize,
    /// Anchored; see the module docs for the dialect.
    pub(crate) pattern: &'static str,
    /// What a value that breaks the pattern is told.
    pub(crate) message: &'static str,
}

// Control characters but tab, line feed and carriage return (Unicode category Cc, as Rust's
// `char::is_control`).
macro_rules! controls_but_newlines {
    () => {
        "\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f"
    };
}
// Every control and white-space character (Rust's `char::is_control` and
// `char::is_whitespace`, spelled out: regex dialects disagree on `\s`).
macro_rules! controls_and_spaces {
    () => {
        "\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
    };
}
// A branch name's character, and the same without `l`, `o`, `c` or `k` (for "not `.lock`"),
// spelled out: class intersection is not ECMA-262.
macro_rules! branch_char {
    () => {
        "[A-Za-z0-9_-]"
    };
    (not "l") => {
        "[A-Za-km-z0-9_-]"
    };
    (not "o") => {
        "[A-Za-np-z0-9_-]"
    };
    (not "c") => {
        "[A-Zabd-z0-9_-]"
    };
    (not "k") => {
        "[A-Za-jl-z0-9_-]"
    };
}

/// Text with a visible character, and no control characters but tab and newlines.
const VISIBLE_TEXT: &str = concat!(
    "^[^",
    controls_but_newlines!(),
    "]*[^",
    controls_and_spaces!(),
    "][^",
    controls_but_newlines!(),
    "]*$"
);

const fn text(max: usize) -> Rule {
    Rule {
        min: 1,
        max,
        pattern: VISIBLE_TEXT,
        message: "must hold a visible character and no control characters but tab and newlines",
    }
}

/// A title or label.
pub(crate) const TITLE: Rule = text(200);
/// A comment, reason or plan step.
pub(crate) const COMMENT: Rule = text(4 * 1024);
/// A summary, learning or rationale.
pub(crate) const SUMMARY: Rule = text(16 * 1024);
/// An agent's message.
pub(crate) const LONG_TEXT: Rule = text(64 * 1024);
/// A file path in a checkpoint.
pub(crate) const PATH: Rule = text(4096);
/// A tool's name.
pub(crate) const TOOL: Rule = text(128);

/// Text that may be empty (a tool's input or output, a feature's description).
pub(crate) const NOTE: Rule = Rule {
    min: 0,
    max: 16 * 1024,
    pattern: concat!("^[^", controls_but_newlines!(), "]*$"),
    message: "must not contain control characters but tab and newlines",
};

/// Prompt text: a visible character, and no NUL (a prompt may quote a terminal's escapes). Its
/// size has its own limit, in bytes and configured, answered with 413 ([`Checks::prompt`]): a
/// length in characters cannot state it, so the schema has none ([`UNBOUNDED`]).
pub(crate) const PROMPT: Rule = Rule {
    min: 1,
    max: UNBOUNDED,
    pattern: concat!("^[^\\u0000]*[^", controls_and_spaces!(), "][^\\u0000]*$"),
    message: "must hold a visible character and no NUL",
};

/// No length limit of the rule's own (another check bounds the value).
pub(crate) const UNBOUNDED: usize = usize::MAX;

/// An opaque identifier (OpenCode's `call_…`, `msg_…`, `ses_…`): visible ASCII.
pub(crate) const ID: Rule = Rule {
    min: 1,
    max: 128,
    pattern: "^[!-~]{1,128}$",
    message: "must be 1 to 128 visible ASCII characters",
};

/// A repository URL: an https, http, ssh, git or file URL, or scp-like `user@host:path`.
pub(crate) const REPOSITORY_URL: Rule = Rule {
    min: 1,
    max: 2048,
    pattern: concat!(
        "^(?:(?:https?|ssh|git|file)://[^",
        controls_and_spaces!(),
        "]+|[^:/",
        controls_and_spaces!(),
        "]*@[^:/",
        controls_and_spaces!(),
        "]*:[^",
        controls_and_spaces!(),
        "]+)$"
    ),
    message: "must be a repository URL (https://, ssh://, git@host:path, ...)",
};

/// A git branch name, a conservative subset of `git check-ref-format --branch`: components of
/// `[A-Za-z0-9_-]` words joined by single dots, the first character of each not `-` or `.`,
/// joined by single slashes, not ending with `.lock`.
pub(crate) const BRANCH: Rule = Rule {
    min: 1,
    max: 255,
    pattern: concat!(
        "^(?:[A-Za-z0-9_]",
        branch_char!(),
        "*(?:\\.",
        branch_char!(),
        "+)*/)*[A-Za-z0-9_]",
        branch_char!(),
        "*(?:(?:\\.",
        branch_char!(),
        "+)*\\.(?:",
        branch_char!(),
        "{1,3}|",
        branch_char!(),
        "{5,}|",
        branch_char!(not "l"),
        branch_char!(),
        "{3}|l",
        branch_char!(not "o"),
        branch_char!(),
        "{2}|lo",
        branch_char!(not "c"),
        branch_char!(),
        "|loc",
        branch_char!(not "k"),
        "))?$"
    ),
    message: "must be a valid git branch name",
};

/// A git commit id.
pub(crate) const COMMIT_SHA: Rule = Rule {
    min: 7,
    max: 64,
    pattern: "^[0-9a-fA-F]{7,64}$",
    message: "must be a commit id of 7 to 64 hex digits",
};

/// A webhook's target: an http(s) URL without spaces or control characters (`canopy-webhook`'s
/// target check then decides, with 422 `webhook_url_*` or `webhook_target_*`).
pub(crate) const WEBHOOK_URL: Rule = Rule {
    min: 1,
    max: 2048,
    // printable ASCII: a host outside ASCII is written in its IDNA (`xn--`) form
    pattern: "^https?://[!-~]+$",
    message: "must be an https URL in printable ASCII",
};

/// An event type's name, as the event schemas name them (`PlanProposed`).
pub(crate) const EVENT_TYPE: Rule = Rule {
    min: 1,
    max: 64,
    pattern: "^[A-Z][A-Za-z0-9]{0,63}$",
    message: "must be an event type name such as PlanProposed",
};

/// The most event types one webhook subscription names.
pub(crate) const EVENT_TYPES: usize = 64;

impl Rule {
    /// Why `value` breaks the rule, if it does.
    pub(crate) fn check(&self, value: &str) -> Option<String> {
        let length = value.chars().count();
        if length < self.min {
            return Some(if self.min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("must be at least {} characters", self.min)
            });
        }
        if length > self.max {
            return Some(format!("must be at most {} characters", self.max));
        }
        (!regex(self.pattern).is_match(value)).then(|| self.message.to_owned())
    }

    /// The field's schema: a string of this length and pattern.
    pub(crate) fn schema(&self) -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(self.min))
            .max_length((self.max != UNBOUNDED).then_some(self.max))
            .pattern(Some(self.pattern))
    }

    /// The schema of an optional field (absent or `null` means none).
    pub(crate) fn nullable(&self) -> ObjectBuilder {
        self.schema()
            .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
    }

    /// The schema of a list of at most [`LIST`] such texts.
    pub(crate) fn list(&self) -> ArrayBuilder {
        ArrayBuilder::new()
            .items(self.schema())
            .max_items(Some(LIST))
    }
}

/// The compiled pattern (each compiled once per process).
fn regex(pattern: &'static str) -> &'static Regex {
    static COMPILED: LazyLock<RwLock<HashMap<&'static str, &'static Regex>>> =
        LazyLock::new(Default::default);
    if let Some(regex) = COMPILED
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(pattern)
    {
        return regex;
    }
    let mut compiled = COMPILED
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    compiled.entry(pattern).or_insert_with(|| {
        Box::leak(Box::new(
            Regex::new(pattern).expect("the rules' patterns are valid"),
        ))
    })
}

/// A request body that checks its own fields.
pub(crate) trait Validate {
    fn validate(&self, checks: &mut Checks<'_>);
}

/// Collects field errors.
#[derive(Debug)]
pub(crate) struct Checks<'a> {
    pub(crate) limits: &'a Limits,
    errors: Vec<FieldError>,
    prompt_too_large: bool,
}

impl<'a> Checks<'a> {
    pub(crate) fn new(limits: &'a Limits) -> Self {
        Self {
            limits,
            errors: Vec::new(),
            prompt_too_large: false,
        }
    }

    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if self.prompt_too_large {
            return Err(ApiError::PromptTooLarge {
                limit: self.limits.max_prompt_bytes,
            });
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }

    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// A field the `rule` governs.
    pub(crate) fn text(&mut self, field: &str, value: &str, rule: &Rule) {
        if let Some(message) = rule.check(value) {
            self.fail(field, message);
        }
    }

    /// Like [`Self::text`], for an optional field.
    pub(crate) fn optional(&mut self, field: &str, value: Option<&str>, rule: &Rule) {
        if let Some(value) = value {
            self.text(field, value, rule);
        }
    }

    /// A number no larger than `max`.
    pub(crate) fn at_most(&mut self, field: &str, value: u64, max: u64) {
        if value > max {
            self.fail(field, format!("must be at most {max}"));
        }
    }

    /// A number no smaller than `min`.
    pub(crate) fn at_least(&mut self, field: &str, value: u64, min: u64) {
        if value < min {
            self.fail(field, format!("must be at least {min}"));
        }
    }

    /// Prompt text: [`PROMPT`], and its configurable size in bytes, answered with 413.
    pub(crate) fn prompt(&mut self, field: &str, value: &str) {
        if value.len() > self.limits.max_prompt_bytes {
            self.prompt_too_large = true;
            return;
        }
        self.text(field, value, &PROMPT);
    }

    /// A list of 1 to `max` entries, each checked by `rule`.
    pub(crate) fn short_list(&mut self, field: &str, values: &[String], rule: &Rule, max: usize) {
        if values.is_empty() || values.len() > max {
            self.fail(field, format!("must hold 1 to {max} entries"));
            return;
        }
        for (i, value) in values.iter().enumerate() {
            self.text(&format!("{field}[{i}]"), value, rule);
        }
    }

    /// A list of at most [`LIST`] entries, each checked by `rule`.
    pub(crate) fn list(&mut self, field: &str, values: &[String], rule: &Rule) {
        if values.len() > LIST {
            self.fail(field, format!("must hold at most {LIST} entries"));
            return;
        }
        for (i, value) in values.iter().enumerate() {
            self.text(&format!("{field}[{i}]"), value, rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(f: impl FnOnce(&mut Checks<'_>)) -> Vec<String> {
        let limits = Limits {
            max_body_bytes: 1024,
            max_prompt_bytes: 10,
        };
        let mut checks = Checks::new(&limits);
        f(&mut checks);
        match checks.finish() {
            Ok(()) => Vec::new(),
            Err(ApiError::Validation(errors)) => errors.into_iter().map(|e| e.field).collect(),
            Err(other) => vec![other.code().to_owned()],
        }
    }

    fn accepts(rule: &Rule, value: &str) -> bool {
        rule.check(value).is_none()
    }

    #[test]
    fn every_pattern_compiles() {
        for rule in [
            &TITLE,
            &COMMENT,
            &SUMMARY,
            &LONG_TEXT,
            &PATH,
            &TOOL,
            &NOTE,
            &PROMPT,
            &ID,
            &REPOSITORY_URL,
            &BRANCH,
            &COMMIT_SHA,
        ] {
            regex(rule.pattern);
        }
    }

    #[test]
    fn branches() {
        for good in [
            "main",
            "canopy/s-1",
            "feature/a.b_c",
            "release/v1.2",
            "x.locks",
            "a.lockx",
            "lock",
            "a/lock",
            "a.loc",
            "a.b.c/d-e",
        ] {
            assert!(accepts(&BRANCH, good), "{good}");
        }
        for bad in [
            "", "-x", "a..b", "a b", "x/", "a.lock", "/a", "a//b", "ü", ".a", "a.", "a/.b", "a./b",
            "x/y.lock", "a/-b",
        ] {
            assert!(!accepts(&BRANCH, bad), "{bad}");
        }
        assert!(!accepts(&BRANCH, &"a".repeat(256)));
    }

    #[test]
    fn repository_urls() {
        for good in [
            "https://github.com/a/b.git",
            "git@github.com:a/b.git",
            "file:///srv/r",
            "ssh://git@h/r",
        ] {
            assert!(accepts(&REPOSITORY_URL, good), "{good}");
        }
        for bad in [
            "",
            "github.com/a/b",
            "https://",
            "https://a b",
            "javascript:alert(1)",
            "https://a\u{0}b",
            "a/b@c:d",
        ] {
            assert!(!accepts(&REPOSITORY_URL, bad), "{bad}");
        }
    }

    #[test]
    fn texts_need_a_visible_character_and_no_controls() {
        assert!(accepts(&TITLE, "Fix the login bug"));
        assert!(accepts(&TITLE, "two\nlines\tand a tab"));
        assert!(accepts(&TITLE, "ü"));
        for bad in ["", " ", "\n\t", "\u{3000}", "a\u{0}", "a\u{1b}b", "\u{85}"] {
            assert!(!accepts(&TITLE, bad), "{bad:?}");
        }
        // characters, not bytes
        assert!(accepts(&TITLE, &"é".repeat(200)));
        assert!(!accepts(&TITLE, &"é".repeat(201)));
        assert!(accepts(&NOTE, ""));
        assert!(!accepts(&NOTE, "\u{7}"));
        assert!(accepts(&PROMPT, "colour: \u{1b}[31m"));
        assert!(!accepts(&PROMPT, "a\u{0}"));
        assert!(!accepts(&PROMPT, " \n"));
    }

    #[test]
    fn every_invalid_field_is_listed_and_prompt_size_is_413() {
        let listed = errors(|c| {
            c.text("title", " ", &TITLE);
            c.text("sha", "xyz", &COMMIT_SHA);
            c.text("call_id", "", &ID);
        });
        assert_eq!(listed, vec!["title", "sha", "call_id"]);
        assert_eq!(
            errors(|c| c.prompt("text", "01234567890")),
            vec!["prompt_too_large"]
        );
    }
}
