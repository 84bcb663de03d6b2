//! The hash chain, verified from an event's stored text alone: the one verification core that the
//! store, query-api's verify endpoint and the offline `canopy audit verify` all run.
//!
//! Each event stores `payload_digest = SHA-256(payload text)`, `event_digest` over its immutable
//! fields (the payload only as its digest) and `hash = SHA-256(prev_hash || event_digest)`. The
//! database computes them on insert (`migrations/20261123000001_event_store.sql`); this module
//! recomputes them in Rust from the fields as Postgres renders them as text (a [`ChainRecord`]),
//! with no database, so an export can be checked anywhere. `docs/audit-format.md` states the
//! exact bytes hashed.
//!
//! What it detects: an altered payload or metadata or any other immutable field, a missing,
//! reordered or inserted event, and (against a [`Head`] kept outside the events table) a removed
//! newest event or a chain re-hashed after an edit. An erased payload passes only when an
//! [`ErasureRecord`] (from an erasure event, itself chained) covers that event with exactly this
//! payload's digest as its tombstone and the original digest as the one replaced.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The aggregate type of erasure events (one stream per erasure).
pub const ERASURE_AGGREGATE_TYPE: &str = "erasure";
/// The event type of an erasure.
pub const ERASURE_EVENT_TYPE: &str = "PersonalDataErased";

/// One stored event as the verifier sees it: every field as the text Postgres renders, digests
/// and hashes as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRecord {
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// `recorded_at` in UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (always six fractional digits).
    pub recorded_at: String,
    /// The payload exactly as stored (`payload::text`).
    pub payload: String,
    /// The metadata exactly as stored (`metadata::text`).
    pub metadata: String,
    pub payload_digest: String,
    pub event_digest: String,
    pub prev_hash: String,
    pub hash: String,
    /// Whether the store marks the payload as erased (informative: coverage by an erasure event
    /// is what the verifier checks).
    #[serde(default)]
    pub erased: bool,
}

/// A stream's latest sequence and hash as recorded outside the events table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub hash: String,
}

/// What an erasure event says about one event it erased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    pub event_id: String,
    /// The payload digest recorded at append time (of the original payload).
    pub original_digest: String,
    /// The digest of the tombstone that replaced the payload.
    pub tombstone_digest: String,
}

/// The outcome of verifying one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub events_checked: usize,
    pub problems: Vec<ChainProblem>,
}

impl ChainReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }

    /// The first problem in sequence order.
    pub fn first_problem(&self) -> Option<&ChainProblem> {
        self.problems.iter().min_by_key(|p| p.sequence)
    }
}

/// One place where the stream does not match its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainProblem {
    pub sequence: i64,
    pub kind: ProblemKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// This sequence number is missing (or out of place) in the stream.
    SequenceGap,
    /// The payload no longer matches the digest recorded at append time, and no erasure covers
    /// it with exactly this payload as its tombstone.
    PayloadAltered,
    /// An immutable field (metadata included, or the recorded payload digest) no longer matches
    /// the event digest.
    EventAltered,
    /// The stored previous hash is not the hash of the event before.
    PrevHashMismatch,
    /// The stored hash is not SHA-256(previous hash || event digest).
    HashMismatch,
    /// The head recorded outside the events table names a later event (the newest were removed)
    /// or another hash (the chain was re-hashed); reported at the head's sequence.
    HeadMismatch,
    /// A field is not what the format requires (not hex, not JSON, wrong stream).
    Malformed,
}

impl ProblemKind {
    /// Why, in words, for people reading a report.
    pub fn describe(self) -> &'static str {
        match self {
            Self::SequenceGap => "this sequence number is missing or out of place",
            Self::PayloadAltered => {
                "the payload does not match its recorded digest and no erasure covers it"
            }
            Self::EventAltered => "a field covered by the event digest was changed",
            Self::PrevHashMismatch => "prev_hash is not the hash of the event before",
            Self::HashMismatch => "hash is not SHA-256(prev_hash || event_digest)",
            Self::HeadMismatch => "the recorded head names another last event or hash",
            Self::Malformed => "a field does not have the required format",
        }
    }
}

/// SHA-256 of the payload text: the stored `payload_digest`.
pub fn payload_digest(payload: &str) -> [u8; 32] {
    Sha256::digest(payload.as_bytes()).into()
}

/// The bytes the event digest is computed over: the text of the JSON array
/// `[event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, recorded_at,
/// hex(payload_digest), metadata]` exactly as Postgres renders `jsonb_build_array(...)::text`
/// (elements separated by `", "`, strings escaped as Postgres's `escape_json`, the metadata as
/// its stored text).
pub fn event_digest_input(record: &ChainRecord, payload_digest_hex: &str) -> String {
    let mut out = String::with_capacity(256 + record.metadata.len());
    out.push('[');
    for (i, text) in [
        record.event_id.as_str(),
        &record.aggregate_type,
        &record.aggregate_id,
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            out.push_str(", ");
        }
        push_json_string(&mut out, text);
    }
    out.push_str(", ");
    out.push_str(&record.sequence.to_string());
    for text in [
        record.event_type.as_str(),
        &record.event_version,
        &record.recorded_at,
        payload_digest_hex,
    ] {
        out.push_str(", ");
        push_json_string(&mut out, text);
    }
    out.push_str(", ");
    out.push_str(&record.metadata);
    out.push(']');
    out
}

/// SHA-256 of [`event_digest_input`].
pub fn event_digest(record: &ChainRecord, payload_digest_hex: &str) -> [u8; 32] {
    Sha256::digest(event_digest_input(record, payload_digest_hex).as_bytes()).into()
}

/// SHA-256(prev_hash || event_digest), the chain link.
pub fn link_hash(prev_hash: &[u8], event_digest: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(prev_hash)
        .chain_update(event_digest)
        .finalize()
        .into()
}

/// Verifies one stream fed in sequence order, a record at a time (so a stream of any length
/// needs constant memory besides its erasures).
#[derive(Debug)]
pub struct ChainVerifier {
    aggregate_type: String,
    aggregate_id: String,
    previous_hash: Vec<u8>,
    expected_sequence: i64,
    last_sequence: i64,
    checked: usize,
    problems: Vec<ChainProblem>,
    erasures: HashMap<String, ErasureRecord>,
    /// Events whose payload differs from its digest, decided at `finish` against the erasures
    /// (which may arrive after the events they cover).
    unmatched_payloads: Vec<(i64, String, String, String)>,
}

impl ChainVerifier {
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<String>) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            previous_hash: vec![0u8; 32],
            expected_sequence: 1,
            last_sequence: 0,
            checked: 0,
            problems: Vec::new(),
            erasures: HashMap::new(),
            unmatched_payloads: Vec::new(),
        }
    }

    /// Adds what an erasure event (already verified in its own stream) says it erased.
    pub fn add_erasure(&mut self, erasure: ErasureRecord) {
        self.erasures.insert(erasure.event_id.clone(), erasure);
    }

    /// Checks the next event of the stream.
    pub fn push(&mut self, record: &ChainRecord) {
        let sequence = record.sequence;
        self.checked += 1;
        let mut report = |kind| self.problems.push(ChainProblem { sequence, kind });
        let decoded = (
            decode_hash(&record.payload_digest),
            decode_hash(&record.event_digest),
            decode_hash(&record.prev_hash),
            decode_hash(&record.hash),
        );
        let (Some(stored_payload_digest), Some(stored_event_digest), Some(prev_hash), Some(hash)) =
            decoded
        else {
            report(ProblemKind::Malformed);
            self.expected_sequence = sequence + 1;
            self.last_sequence = sequence;
            return;
        };
        if record.aggregate_type != self.aggregate_type
            || record.aggregate_id != self.aggregate_id
            || serde_json::from_str::<serde_json::Value>(&record.metadata).is_err()
        {
            report(ProblemKind::Malformed);
        }
        if sequence != self.expected_sequence {
            // named at the first missing (or misplaced) sequence
            self.problems.push(ChainProblem {
                sequence: self.expected_sequence.min(sequence),
                kind: ProblemKind::SequenceGap,
            });
        }
        let mut report = |kind| self.problems.push(ChainProblem { sequence, kind });
        let actual_payload_digest = payload_digest(&record.payload);
        if actual_payload_digest != stored_payload_digest {
            // decided at `finish`, once every erasure is known
            self.unmatched_payloads.push((
                sequence,
                record.event_id.clone(),
                record.payload_digest.clone(),
                hex::encode(actual_payload_digest),
            ));
        }
        let recomputed = event_digest(record, &hex::encode(stored_payload_digest));
        if recomputed != stored_event_digest {
            report(ProblemKind::EventAltered);
        }
        if prev_hash != self.previous_hash[..] {
            report(ProblemKind::PrevHashMismatch);
        }
        // Each hash is checked against the event's own recorded link, so a removed or reordered
        // event shows as a broken link rather than as every later hash being wrong.
        if link_hash(&prev_hash, &recomputed) != hash {
            report(ProblemKind::HashMismatch);
        }
        self.previous_hash = hash.to_vec();
        self.expected_sequence = sequence + 1;
        self.last_sequence = sequence;
    }

    /// Ends the stream: checks erased payloads against the erasures and the last event against
    /// the head recorded outside the events table, when there is one.
    pub fn finish(mut self, head: Option<&Head>) -> ChainReport {
        for (sequence, event_id, stored_digest, actual_digest) in
            std::mem::take(&mut self.unmatched_payloads)
        {
            let covered = self.erasures.get(&event_id).is_some_and(|erasure| {
                erasure.original_digest.eq_ignore_ascii_case(&stored_digest)
                    && erasure
                        .tombstone_digest
                        .eq_ignore_ascii_case(&actual_digest)
            });
            if !covered {
                self.problems.push(ChainProblem {
                    sequence,
                    kind: ProblemKind::PayloadAltered,
                });
            }
        }
        if let Some(head) = head {
            let head_hash = decode_hash(&head.hash);
            let matches = head.sequence == self.last_sequence
                && head_hash.is_some_and(|h| h[..] == self.previous_hash[..]);
            if !matches {
                self.problems.push(ChainProblem {
                    sequence: head.sequence.max(self.last_sequence),
                    kind: ProblemKind::HeadMismatch,
                });
            }
        }
        self.problems.sort_by_key(|p| p.sequence);
        ChainReport {
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            events_checked: self.checked,
            problems: self.problems,
        }
    }
}

/// Verifies a whole stream held in memory.
pub fn verify_records<'a>(
    aggregate_type: &str,
    aggregate_id: &str,
    records: impl IntoIterator<Item = &'a ChainRecord>,
    erasures: impl IntoIterator<Item = ErasureRecord>,
    head: Option<&Head>,
) -> ChainReport {
    let mut verifier = ChainVerifier::new(aggregate_type, aggregate_id);
    for erasure in erasures {
        verifier.add_erasure(erasure);
    }
    for record in records {
        verifier.push(record);
    }
    verifier.finish(head)
}

/// The erasures an erasure event's payload lists (`{"PersonalDataErased": {"events": [..]}}`),
/// or `None` when the record is not an erasure event or does not decode.
pub fn erasures_of(record: &ChainRecord) -> Option<Vec<ErasureRecord>> {
    if record.aggregate_type != ERASURE_AGGREGATE_TYPE || record.event_type != ERASURE_EVENT_TYPE {
        return None;
    }
    #[derive(Deserialize)]
    struct Body {
        events: Vec<ErasureRecord>,
    }
    let mut payload: HashMap<String, Body> = serde_json::from_str(&record.payload).ok()?;
    payload.remove(ERASURE_EVENT_TYPE).map(|body| body.events)
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Appends `text` as a JSON string escaped exactly as Postgres's `escape_json` does: `"`, `\`,
/// `\b`, `\f`, `\n`, `\r`, `\t` by their short escapes, other characters below U+0020 as
/// `\u00xx` (lowercase hex), everything else as is.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_like_postgres_escape_json() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\n\u{1}é/");
        assert_eq!(out, "\"a\\\"b\\\\c\\n\\u0001é/\"");
    }
}
