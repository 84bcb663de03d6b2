//! The audit export format (NDJSON, `docs/audit-format.md`) and its offline verification: the
//! lines `canopy audit export` writes and `canopy audit verify` checks, with no database and no
//! server, through the same [`ChainVerifier`] as the store's `verify_chain`.

use std::collections::HashMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::chain::{
    ChainProblem, ChainRecord, ChainReport, ChainVerifier, ERASURE_AGGREGATE_TYPE, Head,
    erasures_of,
};

/// The format name written in the first line.
pub const FORMAT: &str = "canopy-audit-export/1";

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// The first line: what was exported, and when.
    Export {
        format: String,
        exported_at: String,
        /// `session <id>` or `workspace <id>`.
        scope: String,
    },
    /// One stored event, every chain field as stored.
    Event(Box<ChainRecord>),
    /// A stream's head as recorded outside the events table when the export was taken (after
    /// its events).
    Head(Head),
}

/// What verifying an export found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    pub lines: usize,
    pub events: usize,
    pub streams: Vec<ChainReport>,
    /// Every problem with the line it is on, first line first.
    pub problems: Vec<LineProblem>,
}

impl ExportReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A problem and where it is in the file (1-based line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineProblem {
    pub line: usize,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub problem: ChainProblem,
}

impl std::fmt::Display for LineProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: {}/{} sequence {}: {} ({})",
            self.line,
            self.aggregate_type,
            self.aggregate_id,
            self.problem.sequence,
            serde_json::to_value(self.problem.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.problem.kind.describe()
        )
    }
}

/// A line that is not part of the format at all.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("line {line}: {message}")]
    Unreadable { line: usize, message: String },
    #[error("reading the export: {0}")]
    Io(#[from] std::io::Error),
}

struct Stream {
    verifier: ChainVerifier,
    /// The line of each event by sequence, and of the head.
    lines: HashMap<i64, usize>,
    head: Option<(Head, usize)>,
    last_line: usize,
    erasures: Vec<crate::chain::ErasureRecord>,
}

/// Verifies an export read line by line: every stream's chain (sequence order within a stream,
/// streams interleaved in any way) against its head line, and every erased payload against the
/// erasure events in the export whose own streams verify.
pub fn verify_export(reader: impl BufRead) -> Result<ExportReport, ExportError> {
    let mut streams: HashMap<(String, String), Stream> = HashMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    let mut lines = 0;
    let mut events = 0;
    for (index, text) in reader.lines().enumerate() {
        let text = text?;
        let line = index + 1;
        lines = line;
        let parsed: Line =
            serde_json::from_str(&text).map_err(|error| ExportError::Unreadable {
                line,
                message: error.to_string(),
            })?;
        match parsed {
            Line::Export { format, .. } => {
                if line != 1 || format != FORMAT {
                    return Err(ExportError::Unreadable {
                        line,
                        message: format!("expected the `{FORMAT}` header on line 1 only"),
                    });
                }
            }
            Line::Event(record) => {
                if line == 1 {
                    return Err(ExportError::Unreadable {
                        line,
                        message: format!("expected the `{FORMAT}` header"),
                    });
                }
                events += 1;
                let key = (record.aggregate_type.clone(), record.aggregate_id.clone());
                let stream = streams.entry(key.clone()).or_insert_with(|| {
                    order.push(key.clone());
                    Stream {
                        verifier: ChainVerifier::new(&key.0, &key.1),
                        lines: HashMap::new(),
                        head: None,
                        last_line: line,
                        erasures: Vec::new(),
                    }
                });
                let record = *record;
                stream.verifier.push(&record);
                stream.lines.entry(record.sequence).or_insert(line);
                stream.last_line = line;
                if let Some(erased) = erasures_of(&record) {
                    stream.erasures.extend(erased);
                }
            }
            Line::Head(head) => {
                let key = (head.aggregate_type.clone(), head.aggregate_id.clone());
                match streams.get_mut(&key) {
                    Some(stream) if stream.head.is_none() => stream.head = Some((head, line)),
                    _ => {
                        return Err(ExportError::Unreadable {
                            line,
                            message: "a head must follow its stream's events, once".to_owned(),
                        });
                    }
                }
            }
        }
    }
    if lines == 0 {
        return Err(ExportError::Unreadable {
            line: 1,
            message: "empty export".to_owned(),
        });
    }

    // Erasure streams first: only an intact erasure stream's erasures count.
    let mut reports: HashMap<(String, String), ChainReport> = HashMap::new();
    let mut problems = Vec::new();
    let mut accepted = Vec::new();
    let (erasure_keys, other_keys): (Vec<_>, Vec<_>) = order
        .into_iter()
        .partition(|(kind, _)| kind == ERASURE_AGGREGATE_TYPE);
    for key in erasure_keys.into_iter().chain(other_keys) {
        let Some(mut stream) = streams.remove(&key) else {
            continue;
        };
        if key.0 != ERASURE_AGGREGATE_TYPE {
            for erasure in &accepted {
                stream.verifier.add_erasure(Clone::clone(erasure));
            }
        }
        let last_sequence = stream.lines.keys().max().copied().unwrap_or(0);
        let (head, head_line) = match stream.head {
            Some((head, line)) => (Some(head), line),
            None => (None, stream.last_line),
        };
        let report = stream.verifier.finish(head.as_ref());
        if key.0 == ERASURE_AGGREGATE_TYPE && report.is_intact() {
            accepted.extend(stream.erasures);
        }
        for problem in &report.problems {
            let line = match problem.kind {
                crate::ProblemKind::HeadMismatch => head_line,
                _ => stream
                    .lines
                    .get(&problem.sequence)
                    .copied()
                    .or_else(|| {
                        // a missing sequence: the line of the next event there is
                        stream
                            .lines
                            .iter()
                            .filter(|(sequence, _)| **sequence > problem.sequence)
                            .min_by_key(|(sequence, _)| **sequence)
                            .map(|(_, line)| *line)
                    })
                    .unwrap_or(head_line),
            };
            problems.push(LineProblem {
                line,
                aggregate_type: key.0.clone(),
                aggregate_id: key.1.clone(),
                problem: problem.clone(),
            });
        }
        if head.is_none() {
            problems.push(LineProblem {
                line: stream.last_line,
                aggregate_type: key.0.clone(),
                aggregate_id: key.1.clone(),
                problem: ChainProblem {
                    sequence: last_sequence,
                    kind: crate::ProblemKind::HeadMismatch,
                },
            });
        }
        reports.insert(key, report);
    }
    problems.sort_by_key(|p| (p.line, p.problem.sequence));
    let mut streams: Vec<ChainReport> = reports.into_values().collect();
    streams.sort_by(|a, b| {
        (&a.aggregate_type, &a.aggregate_id).cmp(&(&b.aggregate_type, &b.aggregate_id))
    });
    Ok(ExportReport {
        lines,
        events,
        streams,
        problems,
    })
}
