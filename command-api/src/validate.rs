//! Field checks on request bodies: sizes, formats and required values, collected so that one
//! answer lists every invalid field. The domain still enforces its own rules; these are the
//! edge's limits on what it accepts at all.

use crate::error::{ApiError, FieldError};

/// Size limits from configuration.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_bytes: usize,
}

/// Sizes of the other text fields (bytes).
pub(crate) const TITLE: usize = 200;
pub(crate) const NAME: usize = 255;
pub(crate) const SUMMARY: usize = 16 * 1024;
pub(crate) const COMMENT: usize = 4 * 1024;
pub(crate) const LONG_TEXT: usize = 64 * 1024;
pub(crate) const URL: usize = 2048;
pub(crate) const ID: usize = 128;
pub(crate) const LIST: usize = 1000;
pub(crate) const PATH: usize = 4096;

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

    /// Non-blank text of at most `max` bytes, without control characters other than newlines
    /// and tabs.
    pub(crate) fn text(&mut self, field: &str, value: &str, max: usize) {
        if value.trim().is_empty() {
            self.fail(field, "must not be empty");
        }
        self.bounded(field, value, max);
    }

    /// Like [`Self::text`], for an optional field.
    pub(crate) fn optional_text(&mut self, field: &str, value: Option<&str>, max: usize) {
        if let Some(value) = value {
            self.text(field, value, max);
        }
    }

    /// Text that may be empty, of at most `max` bytes.
    pub(crate) fn bounded(&mut self, field: &str, value: &str, max: usize) {
        if value.len() > max {
            self.fail(field, format!("must be at most {max} bytes"));
        }
        if value
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
        {
            self.fail(field, "must not contain control characters");
        }
    }

    /// Prompt text: its own configurable limit, answered with 413.
    pub(crate) fn prompt(&mut self, field: &str, value: &str) {
        if value.len() > self.limits.max_prompt_bytes {
            self.prompt_too_large = true;
        }
        if value.trim().is_empty() {
            self.fail(field, "must not be empty");
        }
    }

    /// An opaque identifier (OpenCode's `call_…`, `msg_…`, `ses_…`): 1 to 128 visible ASCII.
    pub(crate) fn id(&mut self, field: &str, value: &str) {
        if value.is_empty() || value.len() > ID || !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.fail(field, "must be 1 to 128 visible ASCII characters");
        }
    }

    /// A repository URL: https, http, ssh, git or file URL, or scp-like `user@host:path`.
    pub(crate) fn repository_url(&mut self, field: &str, value: &str) {
        let schemes = ["https://", "http://", "ssh://", "git://", "file://"];
        let has_scheme = schemes
            .iter()
            .any(|s| value.len() > s.len() && value.starts_with(s));
        let scp_like = value.split_once(':').is_some_and(|(host, path)| {
            host.contains('@') && !host.contains('/') && !path.is_empty()
        });
        if value.len() > URL || value.chars().any(char::is_whitespace) || !(has_scheme || scp_like)
        {
            self.fail(
                field,
                "must be a repository URL (https://, ssh://, git@host:path, ...)",
            );
        }
    }

    /// A git branch name (a conservative subset of `git check-ref-format`).
    pub(crate) fn branch(&mut self, field: &str, value: &str) {
        let valid = !value.is_empty()
            && value.len() <= NAME
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
            && !value.starts_with(['-', '/', '.'])
            && !value.ends_with(['/', '.'])
            && !value.ends_with(".lock")
            && !value.contains("..")
            && !value.contains("//")
            && !value.contains("/.");
        if !valid {
            self.fail(field, "must be a valid git branch name");
        }
    }

    /// A git commit id: 7 to 64 hex digits.
    pub(crate) fn commit_sha(&mut self, field: &str, value: &str) {
        if !(7..=64).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.fail(field, "must be a commit id of 7 to 64 hex digits");
        }
    }

    /// A list of at most `LIST` entries, each checked by `each`.
    pub(crate) fn list<T>(
        &mut self,
        field: &str,
        values: &[T],
        mut each: impl FnMut(&mut Self, &str, &T),
    ) {
        if values.len() > LIST {
            self.fail(field, format!("must hold at most {LIST} entries"));
            return;
        }
        for (i, value) in values.iter().enumerate() {
            each(self, &format!("{field}[{i}]"), value);
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

    #[test]
    fn branches() {
        for good in ["main", "canopy/s-1", "feature/a.b_c"] {
            assert!(errors(|c| c.branch("b", good)).is_empty(), "{good}");
        }
        for bad in ["", "-x", "a..b", "a b", "x/", "a.lock", "/a", "a//b", "ü"] {
            assert_eq!(errors(|c| c.branch("b", bad)), vec!["b"], "{bad}");
        }
    }

    #[test]
    fn repository_urls() {
        for good in [
            "https://github.com/a/b.git",
            "git@github.com:a/b.git",
            "file:///srv/r",
        ] {
            assert!(errors(|c| c.repository_url("u", good)).is_empty(), "{good}");
        }
        for bad in [
            "",
            "github.com/a/b",
            "https://",
            "https://a b",
            "javascript:alert(1)",
        ] {
            assert_eq!(errors(|c| c.repository_url("u", bad)), vec!["u"], "{bad}");
        }
    }

    #[test]
    fn every_invalid_field_is_listed_and_prompt_size_is_413() {
        let listed = errors(|c| {
            c.text("title", " ", TITLE);
            c.commit_sha("sha", "xyz");
            c.id("call_id", "");
        });
        assert_eq!(listed, vec!["title", "sha", "call_id"]);
        assert_eq!(
            errors(|c| c.prompt("text", "01234567890")),
            vec!["prompt_too_large"]
        );
    }
}
