//! What the runner records of tool calls: secrets removed, control characters replaced, and
//! cut to a bounded size with the full size noted.
//!
//! Removed: private key blocks, bearer tokens, JWTs, well-known API key shapes (OpenAI-style
//! `sk-…`, GitHub, Slack, AWS access keys), `password=`/`secret:`/`token=`/`api_key=` style
//! assignments, and every literal secret the runner itself holds (the model API key, push
//! credentials, its own token), which is where a sandbox's environment gets its values from.

use std::sync::LazyLock;

use regex::Regex;

/// The text that replaces a secret.
pub const REDACTED: &str = "[redacted]";

static PATTERNS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
        r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}",
        r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}",
        r"\bsk-[A-Za-z0-9_-]{16,}",
        r"\b(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}",
        r"\bgithub_pat_[A-Za-z0-9_]{20,}",
        r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
        r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        r"(?i)\b([A-Za-z0-9_]*(password|passwd|secret|token|api[_-]?key|access[_-]?key)[A-Za-z0-9_]*)(\s*[=:]\s*)(\x22[^\x22\n]*\x22|'[^'\n]*'|[^\s\x22',;]+)",
    ]
    .iter()
    .map(|pattern| Regex::new(pattern).expect("the redaction patterns compile"))
    .collect()
});

/// Redacts and bounds tool text.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Literal secret values (at least 6 bytes) to remove wherever they appear.
    literals: Vec<String>,
}

impl Redactor {
    pub fn new(literals: impl IntoIterator<Item = String>) -> Self {
        let mut literals: Vec<String> = literals.into_iter().filter(|s| s.len() >= 6).collect();
        // Longest first, so a secret containing another is removed whole.
        literals.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self { literals }
    }

    /// `text` without secrets or control characters, at most `max` bytes (plus a note of the
    /// full size when it was cut).
    pub fn clean(&self, text: &str, max: usize) -> String {
        let mut out = text.to_owned();
        for literal in &self.literals {
            if out.contains(literal.as_str()) {
                out = out.replace(literal.as_str(), REDACTED);
            }
        }
        for (index, pattern) in PATTERNS.iter().enumerate() {
            out = if index == PATTERNS.len() - 1 {
                // key = value: keep the key, hide the value
                pattern
                    .replace_all(&out, |caps: &regex::Captures<'_>| {
                        format!("{}{}{REDACTED}", &caps[1], &caps[3])
                    })
                    .into_owned()
            } else {
                pattern.replace_all(&out, REDACTED).into_owned()
            };
        }
        let out: String = out
            .chars()
            .map(|c| {
                if c.is_control() && !matches!(c, '\n' | '\t' | '\r') {
                    '\u{FFFD}'
                } else {
                    c
                }
            })
            .collect();
        truncate(&out, max)
    }
}

/// At most `max` bytes of `text`, cut at a character boundary, with the full size noted.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let note = format!("\n[truncated: {} bytes in full]", text.len());
    let mut end = max.saturating_sub(note.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_go_and_the_rest_stays() {
        let redactor = Redactor::new(["the-model-key-123".to_owned()]);
        let text = "key: the-model-key-123\nOPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwx\n\
                    Authorization: Bearer abc.def.ghi123456\n\
                    -----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n\
                    gh: ghp_abcdefghijklmnopqrstuvwxyz0123\naws AKIAABCDEFGHIJKLMNOP\n\
                    DB_PASSWORD=\"hunter2 x\" ok\nplain words stay";
        let clean = redactor.clean(text, 10_000);
        for secret in [
            "the-model-key-123",
            "sk-abcdef",
            "abc.def.ghi123456",
            "AAAA",
            "ghp_abc",
            "AKIAABCDEFGHIJKLMNOP",
            "hunter2",
        ] {
            assert!(!clean.contains(secret), "{secret} left in {clean}");
        }
        assert!(clean.contains("OPENAI_API_KEY=[redacted]"), "{clean}");
        assert!(clean.contains("DB_PASSWORD=[redacted] ok"), "{clean}");
        assert!(clean.contains("plain words stay"));
    }

    #[test]
    fn control_characters_are_replaced_and_long_text_is_cut() {
        let clean = Redactor::default().clean("a\u{1b}[31mred\u{0}", 100);
        assert_eq!(clean, "a\u{FFFD}[31mred\u{FFFD}");
        let long = "é".repeat(5000);
        let cut = truncate(&long, 1000);
        assert!(cut.len() <= 1000);
        assert!(cut.ends_with("[truncated: 10000 bytes in full]"));
    }
}
