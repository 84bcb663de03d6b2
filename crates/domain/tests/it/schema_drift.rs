//! The checked-in event schemas under `schemas/` must match the code, and every event must
//! serialize the way the schemas and `schemas/README.md` promise.
//!
//! Run with `CANOPY_UPDATE_SCHEMAS=1` to rewrite the files (and the file list in the README)
//! instead of checking them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use canopy_domain::prelude::*;
use cqrs_es::DomainEvent;
use serde_json::Value;

use crate::support::ev;

const UPDATE_ENV: &str = "CANOPY_UPDATE_SCHEMAS";
const LIST_START: &str = "<!-- schema-files:start -->";
const LIST_END: &str = "<!-- schema-files:end -->";

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn update_mode() -> bool {
    std::env::var(UPDATE_ENV).is_ok_and(|v| v == "1")
}

fn hint() -> String {
    format!("run `{UPDATE_ENV}=1 cargo test -p canopy-domain --test it schema_drift` to regenerate")
}

/// `relative path -> contents` of every `*.json` file one directory below `schemas/`.
fn checked_in(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.map(Result::unwrap) {
        if !entry.file_type().unwrap().is_dir() {
            continue;
        }
        let aggregate = entry.file_name().to_string_lossy().into_owned();
        for file in fs::read_dir(entry.path()).unwrap().map(Result::unwrap) {
            let name = file.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                let contents = fs::read_to_string(file.path()).unwrap();
                files.insert(format!("{aggregate}/{name}"), contents);
            }
        }
    }
    files
}

fn expected_files() -> BTreeMap<String, String> {
    event_schemas()
        .iter()
        .map(|s| (s.relative_path(), s.to_file_contents()))
        .collect()
}

fn readme_list(files: &BTreeMap<String, String>) -> String {
    let mut list = String::new();
    for path in files.keys() {
        list.push_str(&format!("- [`{path}`]({path})\n"));
    }
    list
}

/// The README with its generated file list replaced by `list`.
fn readme_with_list(readme: &str, list: &str) -> Option<String> {
    let start = readme.find(LIST_START)? + LIST_START.len();
    let end = readme.find(LIST_END)?;
    (start <= end).then(|| format!("{}\n{list}{}", &readme[..start], &readme[end..]))
}

#[test]
fn checked_in_event_schemas_match_the_code() {
    let dir = schemas_dir();
    let expected = expected_files();
    let actual = checked_in(&dir);
    let readme_path = dir.join("README.md");
    let readme = fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", readme_path.display()));
    let wanted_readme = readme_with_list(&readme, &readme_list(&expected)).unwrap_or_else(|| {
        panic!(
            "{} lacks the {LIST_START} .. {LIST_END} markers",
            readme_path.display()
        )
    });

    if update_mode() {
        for (path, contents) in &expected {
            if actual.get(path) != Some(contents) {
                let target = dir.join(path);
                fs::create_dir_all(target.parent().unwrap()).unwrap();
                fs::write(&target, contents).unwrap();
            }
        }
        for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
            fs::remove_file(dir.join(path)).unwrap();
        }
        if wanted_readme != readme {
            fs::write(&readme_path, wanted_readme).unwrap();
        }
        return;
    }

    let mut problems = Vec::new();
    for (path, contents) in &expected {
        match actual.get(path) {
            None => problems.push(format!("missing: schemas/{path}")),
            Some(found) if found != contents => {
                problems.push(format!("differs from the code: schemas/{path}"));
            }
            Some(_) => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        problems.push(format!(
            "stale (no such event type or version): schemas/{path}"
        ));
    }
    if wanted_readme != readme {
        problems.push("the file list in schemas/README.md is out of date".to_owned());
    }
    assert!(
        problems.is_empty(),
        "checked-in event schemas are out of date:\n  {}\n{}",
        problems.join("\n  "),
        hint()
    );
}

#[test]
fn every_event_type_has_a_schema_at_each_version_it_was_stored_at() {
    let schemas = event_schemas();
    let mut seen = std::collections::BTreeSet::new();
    for schema in &schemas {
        assert!(
            seen.insert((schema.aggregate_type, schema.event_type, schema.version)),
            "{} v{} listed twice",
            schema.event_type,
            schema.version
        );
        let expected = if schema.event_type == "UsageRecorded" {
            ["1", "2"].as_slice()
        } else {
            ["1"].as_slice()
        };
        assert!(expected.contains(&schema.version), "{}", schema.event_type);
        assert_eq!(schema.schema["title"], schema.event_type);
    }
    // 29 session, 5 feature, 6 webhook and 2 budget event types, the erasure, and
    // UsageRecorded's version 1
    assert_eq!(schemas.len(), 29 + 5 + 6 + 2 + 1 + 1);
}

#[test]
fn the_fixed_event_names_are_still_there() {
    for name in [
        "PromptSubmitted",
        "PlanProposed",
        "PlanApproved",
        "ToolExecuted",
        "CheckpointTaken",
    ] {
        assert!(
            event_schemas()
                .iter()
                .any(|s| s.aggregate_type == "session" && s.event_type == name),
            "{name} is gone"
        );
    }
}

/// Checks the stored shape `{"<EventType>": <body>}` of `event`, and that `body` has the
/// schema's required fields and nothing the schema does not know.
fn check_shape(aggregate_type: &str, event_type: &str, version: &str, stored: Value) {
    let object = stored
        .as_object()
        .expect("an event is stored as a json object");
    assert_eq!(object.len(), 1, "{event_type}: one key, the event type");
    let body = object
        .get(event_type)
        .unwrap_or_else(|| panic!("{event_type}: stored under its own type name"));
    let schema = event_schemas()
        .into_iter()
        .find(|s| {
            s.aggregate_type == aggregate_type && s.event_type == event_type && s.version == version
        })
        .unwrap_or_else(|| panic!("no schema for {aggregate_type}/{event_type} v{version}"))
        .schema;
    let properties = schema["properties"].as_object().unwrap();
    let body = body.as_object().unwrap();
    for key in body.keys() {
        assert!(
            properties.contains_key(key),
            "{event_type}.{key} is not in its schema"
        );
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        let required = required.as_str().unwrap();
        assert!(body.contains_key(required), "{event_type} lacks {required}");
    }
}

#[test]
fn every_session_event_serializes_as_its_schema_says() {
    let events = ev::one_of_each();
    let mut types: Vec<_> = events.iter().map(DomainEvent::event_type).collect();
    types.sort();
    types.dedup();
    assert_eq!(
        types.len(),
        SessionEvent::schemas().len(),
        "one sample per event type"
    );
    for event in events {
        let stored = serde_json::to_value(&event).unwrap();
        check_shape(
            "session",
            &event.event_type(),
            &event.event_version(),
            stored.clone(),
        );
        let back: SessionEvent = serde_json::from_value(stored).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn every_feature_event_serializes_as_its_schema_says() {
    let id = uuid::Uuid::from_u128;
    let events: Vec<FeatureEvent> = vec![
        FeatureCreated {
            feature_id: id(1),
            workspace_id: "ws".into(),
            title: "t".into(),
            description: "d".into(),
            created_by: "u".into(),
        }
        .into(),
        SessionAttached {
            session_id: id(2),
            attached_by: "u".into(),
        }
        .into(),
        LearningShared {
            learning_id: id(3),
            session_id: Some(id(2)),
            text: "x".into(),
            shared_by: "u".into(),
            shared_by_name: "U".into(),
        }
        .into(),
        DecisionRecorded {
            decision_id: id(4),
            title: "t".into(),
            rationale: "r".into(),
            recorded_by: "u".into(),
        }
        .into(),
        FeatureCompleted {
            completed_by: "u".into(),
        }
        .into(),
    ];
    assert_eq!(events.len(), FeatureEvent::schemas().len());
    for event in events {
        let stored = serde_json::to_value(&event).unwrap();
        check_shape(
            "feature",
            &event.event_type(),
            &event.event_version(),
            stored.clone(),
        );
        let back: FeatureEvent = serde_json::from_value(stored).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn every_budget_event_serializes_as_its_schema_says() {
    let events: Vec<BudgetEvent> = vec![
        BudgetSet {
            workspace_id: "ws".into(),
            kind: BudgetKind::SessionAgentSeconds,
            limit: 600,
            set_by: "u".into(),
        }
        .into(),
        BudgetCleared {
            workspace_id: "ws".into(),
            kind: BudgetKind::SessionAgentSeconds,
            cleared_by: "u".into(),
        }
        .into(),
    ];
    assert_eq!(events.len(), BudgetEvent::schemas().len());
    for event in events {
        let stored = serde_json::to_value(&event).unwrap();
        check_shape(
            "budget",
            &event.event_type(),
            &event.event_version(),
            stored.clone(),
        );
        let back: BudgetEvent = serde_json::from_value(stored).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn unknown_fields_are_tolerated_and_missing_optionals_are_none() {
    let stored = serde_json::json!({
        "PromptCompleted": {
            "prompt_id": "00000000-0000-0000-0000-000000000101",
            "added_in_a_later_release": true
        }
    });
    let event: SessionEvent = serde_json::from_value(stored).unwrap();
    assert_eq!(
        event,
        PromptCompleted {
            prompt_id: crate::support::P1,
            summary: None,
        }
        .into()
    );
}

#[test]
fn event_type_and_version_come_from_the_payload_table() {
    let event: SessionEvent = PromptStarted {
        prompt_id: crate::support::P1,
    }
    .into();
    assert_eq!(event.event_type(), PromptStarted::EVENT_TYPE);
    assert_eq!(event.event_version(), PromptStarted::VERSION);
    assert_eq!(PromptStarted::AGGREGATE_TYPE, "session");
    assert_eq!(FeatureCreated::AGGREGATE_TYPE, "feature");
}

#[test]
fn a_usage_recorded_stored_at_version_1_is_upcast_to_version_2() {
    use canopy_domain::session::UsageRecorded;
    use canopy_domain::upcast::{decode_session_event, upcast};
    let prompt = uuid::Uuid::new_v4();
    let stored = serde_json::json!({"UsageRecorded": {
        "prompt_id": prompt, "tokens_in": 1200, "tokens_out": 340, "cost_micro_usd": 5600
    }});
    let expected = SessionEvent::from(UsageRecorded {
        prompt_id: prompt,
        input_tokens: 1200,
        output_tokens: 340,
        cost_micro_usd: 5600,
    });
    // The stored shape is version 1's schema, kept under schemas/.
    check_shape("session", "UsageRecorded", "1", stored.clone());
    // Version 1 does not decode as the current struct, and decodes once upcast.
    assert!(serde_json::from_value::<SessionEvent>(stored.clone()).is_err());
    assert_eq!(
        decode_session_event("UsageRecorded", "1", stored.clone()).unwrap(),
        expected
    );
    assert_eq!(upcast("UsageRecorded", "1", stored).0, "2");
    // The current version passes unchanged.
    let current = serde_json::to_value(&expected).unwrap();
    assert_eq!(
        decode_session_event("UsageRecorded", "2", current).unwrap(),
        expected
    );
    // As a cqrs-es upcaster too.
    use cqrs_es::persist::{EventUpcaster, SerializedEvent};
    let step = &canopy_domain::upcast::UPCASTERS[0];
    assert!(step.can_upcast("UsageRecorded", "1"));
    assert!(!step.can_upcast("UsageRecorded", "2"));
    let upcast = step.upcast(SerializedEvent {
        aggregate_id: "s".into(),
        sequence: 1,
        aggregate_type: "session".into(),
        event_type: "UsageRecorded".into(),
        event_version: "1".into(),
        payload: serde_json::json!({"UsageRecorded": {"prompt_id": prompt, "tokens_in": 1, "tokens_out": 2, "cost_micro_usd": 3}}),
        metadata: serde_json::json!({}),
    });
    assert_eq!(upcast.event_version, "2");
    assert_eq!(upcast.payload["UsageRecorded"]["input_tokens"], 1);
}
