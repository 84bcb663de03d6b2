//! The runner's only way to write: command-api's runner endpoints, with the runner token.
//!
//! Every report carries an `Idempotency-Key` derived from what it records (the prompt id and
//! OpenCode's message, part or call id, or the sequence of the request it answers), so a retry
//! after a timeout, a redelivered wake-up or a takeover by another runner records nothing twice:
//! command-api answers a repeated key with the first answer. Transient failures (connection,
//! 5xx, 409 conflicts, 429) are retried with backoff under the same key; a refusal (any other
//! 4xx) is returned to the driver, which reloads the session and decides again.

use std::time::Duration;

use canopy_process::Backoff;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Why a report was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// command-api refused it: the session moved on (a prompt cancelled, a plan decided).
    #[error("command-api refused {path}: {status} {code}: {detail}")]
    Refused {
        path: String,
        status: u16,
        code: String,
        detail: String,
    },
    /// command-api could not be reached or kept failing.
    #[error("command-api unavailable for {path}: {detail}")]
    Unavailable { path: String, detail: String },
}

impl RecordError {
    /// The problem's stable code, for refusals.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            Self::Unavailable { .. } => None,
        }
    }
}

/// A client of command-api's runner endpoints.
#[derive(Debug, Clone)]
pub struct Recorder {
    http: reqwest::Client,
    /// command-api's base URLs: a retry goes to the next one (several processes without a load
    /// balancer in front, or one behind it).
    bases: Vec<String>,
    token: String,
    attempts: u32,
}

impl Recorder {
    /// `base` is one URL or several, comma-separated.
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        anyhow::ensure!(!bases.is_empty(), "no command-api URL");
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            bases,
            token: token.to_owned(),
            attempts: 8,
        })
    }

    /// Posts `body` to `/runner/sessions/{session}/{path}` under `key`.
    pub async fn post(
        &self,
        session: Uuid,
        path: &str,
        key: &str,
        body: &impl Serialize,
    ) -> Result<Value, RecordError> {
        let key = idempotency_key(key);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let mut pause = backoff.next_delay();
            let base = &self.bases[(attempt as usize - 1) % self.bases.len()];
            let url = format!("{base}/runner/sessions/{session}/{path}");
            let sent = self
                .http
                .post(&url)
                .bearer_auth(&self.token)
                .header("idempotency-key", &key)
                .json(body)
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    if status.is_success() {
                        metrics::counter!("canopy_runner_reports_total", "path" => path_label(path))
                            .increment(1);
                        return Ok(body);
                    }
                    let code = body["code"].as_str().unwrap_or_default().to_owned();
                    let detail = body["detail"].as_str().unwrap_or_default().to_owned();
                    let transient = status.is_server_error()
                        || status.as_u16() == 429
                        // a lost append race, or the same key still being answered
                        || (status.as_u16() == 409 && retry_after.is_some());
                    if !transient {
                        return Err(RecordError::Refused {
                            path: path.to_owned(),
                            status: status.as_u16(),
                            code,
                            detail,
                        });
                    }
                    last = format!("{status} {code}");
                    if let Some(wait) = retry_after {
                        pause = pause.max(wait.min(Duration::from_secs(5)));
                    }
                }
                Err(error) => last = error.to_string(),
            }
            tracing::debug!(%url, attempt, %last, "report not recorded yet; retrying");
            tokio::time::sleep(pause).await;
        }
        Err(RecordError::Unavailable {
            path: path.to_owned(),
            detail: last,
        })
    }
}

/// Keys are at most 255 visible ASCII characters: longer ones keep their start and a digest.
fn idempotency_key(key: &str) -> String {
    let clean: String = key
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if clean.len() <= 200 {
        return clean;
    }
    let digest = Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes());
    format!("{}~{digest}", &clean[..150])
}

fn path_label(path: &str) -> &'static str {
    match path.split('/').next().unwrap_or_default() {
        "prompts" => "prompts",
        "plans" => "plans",
        "tool-approvals" => "tool-approvals",
        "tool-executions" => "tool-executions",
        "messages" => "messages",
        "usage" => "usage",
        "checkpoints" => "checkpoints",
        "restores" => "restores",
        "pushes" => "pushes",
        "sandbox" => "sandbox",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_short_and_visible() {
        assert_eq!(idempotency_key("tool:p:call 1"), "tool:p:call_1");
        let long = "x".repeat(400);
        let key = idempotency_key(&long);
        assert!(key.len() <= 255);
        assert_ne!(idempotency_key(&format!("{long}a")), key);
    }
}
