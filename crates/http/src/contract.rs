//! A small contract checker (what schemathesis does, for our documents and in our tests): it
//! walks an OpenAPI 3.1 document and, for every operation, sends a running API requests that
//! keep the document's promises and requests that break each of its constraints, plus a few
//! malformed ones, and checks every answer against the document.
//!
//! - Every answer's status is documented for its operation, its media type is the documented
//!   one, and its body validates against the documented schema (JSON Schema 2020-12, formats
//!   checked).
//! - A request that keeps every promise is not refused as invalid (no 400, 413, 415 or 422).
//! - A request that breaks one constraint (a length, pattern, enum, format, bound, type,
//!   required field or parameter, or an unknown field) is refused with a 4xx problem; a
//!   parameter or field is named in `errors` when the answer is 422.
//! - Malformed requests: no or a bad token (401), bad JSON (400), a body not declared as JSON
//!   (415), a body that is not an object (422), and a method the path does not have (405 with
//!   `Allow`).
//!
//! Valid values come from the schema: an `example`, an enum's first value, a bound, a format, or
//! the first of a few candidates that validates; a fixture (a real id) where the caller names
//! one. The checker sends requests one at a time and reports every mismatch, so one run shows
//! them all.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// What the checker needs to know about the API under test.
#[derive(Debug, Default)]
pub struct Setup {
    /// The bearer token an operation is called with, by operation id (falls back to
    /// `default_token`).
    pub tokens: HashMap<String, String>,
    pub default_token: String,
    /// Values for path parameters and body fields, by name (real ids, so that requests reach
    /// the handlers' happy paths); `operationId.name` wins over `name`.
    pub fixtures: HashMap<String, Value>,
    /// Statuses a valid request may get besides 2xx, 401, 403, 404, 409 and 429, by operation
    /// id, with why (for example 426 from a WebSocket endpoint asked without a handshake).
    pub also_valid: HashMap<String, Vec<u16>>,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: usize,
    /// Answers by status.
    pub statuses: BTreeMap<u16, usize>,
    pub failures: Vec<String>,
}

impl Report {
    /// A summary line: requests sent and answers by status.
    pub fn summary(&self) -> String {
        let mut line = format!("{} requests;", self.requests);
        for (status, count) in &self.statuses {
            let _ = write!(line, " {status}×{count}");
        }
        let _ = write!(line, "; {} failures", self.failures.len());
        line
    }
}

/// Checks the API at `base` (e.g. `http://127.0.0.1:1234`) against `document`.
pub async fn check(document: &Value, base: &str, setup: &Setup) -> Report {
    let checker = Checker {
        document,
        base: base.trim_end_matches('/'),
        setup,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds"),
    };
    let mut report = Report::default();
    let Some(paths) = document["paths"].as_object() else {
        report.failures.push("the document has no paths".to_owned());
        return report;
    };
    for (template, item) in paths {
        let Some(item) = item.as_object() else {
            continue;
        };
        for (method, operation) in item {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let operation = Operation::read(&checker, method, template, operation);
            checker.operation(&operation, &mut report).await;
        }
        checker.unknown_methods(template, item, &mut report).await;
    }
    report
}

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// One documented operation, with its parameters and body resolved.
#[derive(Debug)]
struct Operation<'d> {
    id: String,
    method: reqwest::Method,
    template: String,
    parameters: Vec<Parameter<'d>>,
    /// The body's schema (resolved), whether it is required, and whether `null` is valid.
    body: Option<Body>,
    responses: &'d Map<String, Value>,
    secured: bool,
}

#[derive(Debug)]
struct Parameter<'d> {
    name: &'d str,
    location: &'d str,
    required: bool,
    schema: Value,
}

#[derive(Debug)]
struct Body {
    schema: Value,
    required: bool,
    nullable: bool,
}

/// A request to send.
#[derive(Debug, Clone)]
struct Request {
    path: BTreeMap<String, String>,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    token: Option<String>,
    /// The body, as (content type, bytes).
    body: Option<(String, Vec<u8>)>,
}

/// What a request should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Anything but a refusal of the input (2xx, 401, 403, 404, 409, 429 or an allowed one).
    Accepted,
    /// A 4xx problem (with 422, `errors` names the parameter or field broken).
    Refused,
    Status(u16),
}

struct Checker<'a> {
    document: &'a Value,
    base: &'a str,
    setup: &'a Setup,
    client: reqwest::Client,
}

impl<'d> Operation<'d> {
    fn read(checker: &Checker<'d>, method: &str, template: &str, operation: &'d Value) -> Self {
        let id = operation["operationId"]
            .as_str()
            .map_or_else(|| format!("{method} {template}"), str::to_owned);
        let parameters = operation["parameters"]
            .as_array()
            .map(|parameters| {
                parameters
                    .iter()
                    .map(|p| {
                        let mut schema = checker.resolve(&p["schema"]);
                        // a parameter's example stands for its schema's (an annotation)
                        if let (Some(example), Value::Object(object)) =
                            (p.get("example"), &mut schema)
                        {
                            object.entry("example").or_insert_with(|| example.clone());
                        }
                        Parameter {
                            name: p["name"].as_str().unwrap_or_default(),
                            location: p["in"].as_str().unwrap_or_default(),
                            required: p["required"].as_bool().unwrap_or(false),
                            schema,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body = operation["requestBody"]["content"]["application/json"]["schema"]
            .as_object()
            .map(|_| {
                let schema = checker
                    .resolve(&operation["requestBody"]["content"]["application/json"]["schema"]);
                let (schema, nullable) = match schema["oneOf"].as_array() {
                    Some(choices) => {
                        let nullable = choices.iter().any(|c| c["type"] == "null");
                        let object = choices
                            .iter()
                            .find(|c| c["type"] != "null")
                            .map(|c| checker.resolve(c))
                            .unwrap_or(Value::Null);
                        (object, nullable)
                    }
                    None => (schema, false),
                };
                Body {
                    schema,
                    required: operation["requestBody"]["required"]
                        .as_bool()
                        .unwrap_or(false),
                    nullable,
                }
            });
        Self {
            id,
            method: method.to_uppercase().parse().expect("an HTTP method"),
            template: template.to_owned(),
            parameters,
            body,
            responses: operation["responses"].as_object().unwrap_or_else(|| {
                static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
                EMPTY.get_or_init(Map::new)
            }),
            secured: operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
        }
    }

    fn label(&self) -> String {
        format!("{} {} ({})", self.method, self.template, self.id)
    }
}

impl Checker<'_> {
    /// Follows a local `$ref` (once per level, recursively for nested `$ref`s at the top).
    fn resolve(&self, schema: &Value) -> Value {
        let mut schema = schema.clone();
        for _ in 0..8 {
            let Some(reference) = schema["$ref"].as_str() else {
                return schema;
            };
            let Some(pointer) = reference.strip_prefix('#') else {
                return schema;
            };
            schema = self
                .document
                .pointer(pointer)
                .cloned()
                .unwrap_or(Value::Null);
        }
        schema
    }

    /// Whether `value` is valid against `schema`, with the document's components in reach.
    fn valid(&self, schema: &Value, value: &Value) -> Result<(), String> {
        let mut root = match schema {
            Value::Object(object) => Value::Object(object.clone()),
            Value::Bool(_) => schema.clone(),
            _ => return Err(format!("not a schema: {schema}")),
        };
        if let Value::Object(object) = &mut root {
            object.insert("components".to_owned(), self.document["components"].clone());
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&root)
            .map_err(|e| format!("the schema does not compile: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn fixture(&self, operation: &Operation<'_>, name: &str) -> Option<Value> {
        self.setup
            .fixtures
            .get(&format!("{}.{name}", operation.id))
            .or_else(|| self.setup.fixtures.get(name))
            .cloned()
    }

    /// A value valid against `schema` (its name picks a fixture).
    fn valid_value(
        &self,
        operation: &Operation<'_>,
        name: &str,
        schema: &Value,
    ) -> Result<Value, String> {
        let schema = self.resolve(schema);
        let mut candidates = Vec::new();
        if let Some(fixture) = self.fixture(operation, name) {
            candidates.push(fixture);
        }
        if name.eq_ignore_ascii_case("idempotency-key") {
            candidates.push(json!(uuid::Uuid::new_v4().to_string()));
        }
        if let Some(example) = schema.get("example") {
            candidates.push(example.clone());
        }
        if let Some(examples) = schema["examples"].as_array() {
            candidates.extend(examples.iter().cloned());
        }
        if let Some(values) = schema["enum"].as_array() {
            candidates.extend(values.iter().cloned());
        }
        if let Some(choices) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
            for choice in choices {
                if let Ok(value) = self.valid_value(operation, name, choice) {
                    candidates.push(value);
                }
            }
        }
        match types(&schema).first().map(String::as_str) {
            Some("object") => candidates.push(self.valid_object(operation, &schema, true)?),
            Some("array") => {
                let item = self.valid_value(operation, name, &schema["items"])?;
                candidates.push(json!([item]));
            }
            Some("integer" | "number") => {
                let low = schema["minimum"].as_i64().unwrap_or(0);
                candidates.extend([json!(low.max(1)), json!(low)]);
                if let Some(high) = schema["maximum"].as_i64() {
                    candidates.push(json!(high));
                }
            }
            Some("boolean") => candidates.push(json!(true)),
            Some("string") => {
                match schema["format"].as_str() {
                    Some("uuid") => candidates.push(json!(uuid::Uuid::new_v4().to_string())),
                    Some("date-time") => candidates.push(json!("2020-01-01T00:00:00Z")),
                    Some("date") => candidates.push(json!("2020-01-01")),
                    _ => {}
                }
                candidates.extend(
                    [
                        "Fix the login bug",
                        "main",
                        "https://git.example.invalid/app.git",
                        "0123456789abcdef",
                        "call_1",
                        "a",
                        "",
                    ]
                    .map(Value::from),
                );
            }
            Some("null") => candidates.push(Value::Null),
            _ => {}
        }
        candidates
            .into_iter()
            .find(|candidate| self.valid(&schema, candidate).is_ok())
            .ok_or_else(|| {
                format!(
                    "{}: no valid value found for `{name}` (give its schema an example): {schema}",
                    operation.label()
                )
            })
    }

    /// An object valid against `schema`: its required properties, or all of them.
    fn valid_object(
        &self,
        operation: &Operation<'_>,
        schema: &Value,
        all: bool,
    ) -> Result<Value, String> {
        let required = required(schema);
        let mut object = Map::new();
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                if all || required.contains(name) {
                    object.insert(name.clone(), self.valid_value(operation, name, property)?);
                }
            }
        }
        Ok(Value::Object(object))
    }

    /// The request that keeps every promise: required parameters (all of them when `all`), and a
    /// body of the required fields (all of them when `all`).
    fn valid_request(&self, operation: &Operation<'_>, all: bool) -> Result<Request, String> {
        let mut request = Request {
            path: BTreeMap::new(),
            query: Vec::new(),
            headers: Vec::new(),
            token: operation.secured.then(|| {
                self.setup
                    .tokens
                    .get(&operation.id)
                    .unwrap_or(&self.setup.default_token)
                    .clone()
            }),
            body: None,
        };
        for parameter in &operation.parameters {
            // an optional parameter that authenticates on its own (a stream ticket) is left out
            if !(parameter.required || all) || parameter.name == "ticket" {
                continue;
            }
            let value = self.valid_value(operation, parameter.name, &parameter.schema)?;
            let text = match &value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            match parameter.location {
                "path" => {
                    request.path.insert(parameter.name.to_owned(), text);
                }
                "query" => request.query.push((parameter.name.to_owned(), text)),
                "header" => request.headers.push((parameter.name.to_owned(), text)),
                _ => {}
            }
        }
        if let Some(body) = &operation.body
            && (body.required || all)
        {
            let value = self.valid_object(operation, &body.schema, all)?;
            request.body = Some(json_body(&value));
        }
        Ok(request)
    }

    async fn operation(&self, operation: &Operation<'_>, report: &mut Report) {
        let mut base = None;
        for all in [false, true] {
            match self.valid_request(operation, all) {
                Ok(request) => {
                    self.send_and_check(operation, &request, Expect::Accepted, None, report)
                        .await;
                    if !all {
                        base = Some(request);
                    }
                }
                Err(error) => report.failures.push(error),
            }
        }
        let Some(base) = base else {
            return;
        };
        for (what, request, expect, field) in self.violations(operation, &base) {
            self.send_and_check(operation, &request, expect, Some((&what, field)), report)
                .await;
        }
    }

    /// Requests that break one promise each, with what they break and what they should get.
    fn violations(
        &self,
        operation: &Operation<'_>,
        base: &Request,
    ) -> Vec<(String, Request, Expect, Option<String>)> {
        let mut cases = Vec::new();
        if operation.secured {
            let mut request = base.clone();
            request.token = None;
            cases.push(("no token".to_owned(), request, Expect::Status(401), None));
            let mut request = base.clone();
            request.token = Some("not-a-jwt".to_owned());
            cases.push(("a bad token".to_owned(), request, Expect::Status(401), None));
        }
        for parameter in &operation.parameters {
            let expect_for = |location: &str| match location {
                "header" => Expect::Refused,
                _ => Expect::Status(422),
            };
            if parameter.required && parameter.location != "path" {
                let mut request = base.clone();
                request.query.retain(|(n, _)| n != parameter.name);
                request
                    .headers
                    .retain(|(n, _)| !n.eq_ignore_ascii_case(parameter.name));
                cases.push((
                    format!(
                        "without the required {} `{}`",
                        parameter.location, parameter.name
                    ),
                    request,
                    Expect::Refused,
                    None,
                ));
            }
            if parameter.name == "ticket" {
                continue;
            }
            for (what, value) in violating_values(self, &parameter.schema) {
                let text = match &value {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                // on the wire a parameter is text: `42` is a fine string
                if self
                    .valid(&parameter.schema, &wire_value(&parameter.schema, &text))
                    .is_ok()
                {
                    continue;
                }
                // a header cannot carry every character
                if parameter.location == "header"
                    && reqwest::header::HeaderValue::from_str(&text).is_err()
                {
                    continue;
                }
                let mut request = base.clone();
                match parameter.location {
                    "path" => {
                        request.path.insert(parameter.name.to_owned(), text);
                    }
                    "query" => {
                        request.query.retain(|(n, _)| n != parameter.name);
                        request.query.push((parameter.name.to_owned(), text));
                    }
                    "header" => {
                        request
                            .headers
                            .retain(|(n, _)| !n.eq_ignore_ascii_case(parameter.name));
                        request.headers.push((parameter.name.to_owned(), text));
                    }
                    _ => continue,
                }
                cases.push((
                    format!("{} `{}` {what}", parameter.location, parameter.name),
                    request,
                    expect_for(parameter.location),
                    Some(parameter.name.to_owned()),
                ));
            }
        }
        if let Some(body) = &operation.body {
            let valid = match self.valid_object(operation, &body.schema, true) {
                Ok(valid) => valid,
                Err(error) => {
                    cases.push((error, base.clone(), Expect::Refused, None));
                    return cases;
                }
            };
            let with_body = |value: &Value| {
                let mut request = base.clone();
                request.body = Some(json_body(value));
                request
            };
            let raw = |content_type: &str, bytes: &[u8]| {
                let mut request = base.clone();
                request.body = Some((content_type.to_owned(), bytes.to_vec()));
                request
            };
            cases.push((
                "a body that is not JSON".to_owned(),
                raw("application/json", b"{\"oops\": "),
                Expect::Status(400),
                None,
            ));
            cases.push((
                "a body not declared as JSON".to_owned(),
                raw(
                    "text/plain",
                    &serde_json::to_vec(&valid).unwrap_or_default(),
                ),
                Expect::Status(415),
                None,
            ));
            cases.push((
                "a body that is an array".to_owned(),
                with_body(&json!([])),
                Expect::Status(422),
                None,
            ));
            let null_expect = if body.nullable && required(&body.schema).is_empty() {
                Expect::Accepted
            } else {
                Expect::Status(422)
            };
            cases.push((
                "a null body".to_owned(),
                with_body(&Value::Null),
                null_expect,
                None,
            ));
            if body.schema["additionalProperties"] == json!(false) {
                let mut object = valid.clone();
                object["unexpected_field"] = json!(1);
                cases.push((
                    "an unknown field".to_owned(),
                    with_body(&object),
                    Expect::Status(422),
                    Some("unexpected_field".to_owned()),
                ));
            }
            for name in required(&body.schema) {
                let mut object = valid.clone();
                if let Some(map) = object.as_object_mut() {
                    map.remove(&name);
                }
                cases.push((
                    format!("without the required field `{name}`"),
                    with_body(&object),
                    Expect::Status(422),
                    Some(name.clone()),
                ));
            }
            if let Some(properties) = body.schema["properties"].as_object() {
                for (name, property) in properties {
                    for (what, value) in violating_values(self, property) {
                        let mut object = valid.clone();
                        object[name] = value;
                        cases.push((
                            format!("field `{name}` {what}"),
                            with_body(&object),
                            Expect::Refused,
                            Some(name.clone()),
                        ));
                    }
                }
            }
        }
        cases
    }

    async fn send_and_check(
        &self,
        operation: &Operation<'_>,
        request: &Request,
        expect: Expect,
        case: Option<(&str, Option<String>)>,
        report: &mut Report,
    ) {
        let what = case.as_ref().map_or("a valid request", |(what, _)| what);
        let label = format!("{}, {what}", operation.label());
        let mut path = operation.template.clone();
        for (name, value) in &request.path {
            path = path.replace(&format!("{{{name}}}"), &encode_path(value));
        }
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .expect("the base and the template make a URL");
        if !request.query.is_empty() {
            url.query_pairs_mut().extend_pairs(request.query.iter());
        }
        let mut builder = self.client.request(operation.method.clone(), url);
        if let Some(token) = &request.token {
            builder = builder.bearer_auth(token);
        }
        for (name, value) in &request.headers {
            // every request is a new one: a key used twice would answer the first request's
            // answer (or refuse a different request), whatever this one holds
            let value = if name.eq_ignore_ascii_case("idempotency-key")
                && value.len() == 36
                && uuid::Uuid::try_parse(value).is_ok()
            {
                uuid::Uuid::new_v4().to_string()
            } else {
                value.clone()
            };
            builder = builder.header(name, value);
        }
        if let Some((content_type, bytes)) = &request.body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes.clone());
        }
        report.requests += 1;
        let response = match builder.send().await {
            Ok(response) => response,
            Err(error) => {
                report.failures.push(format!("{label}: no answer: {error}"));
                return;
            }
        };
        let status = response.status().as_u16();
        *report.statuses.entry(status).or_default() += 1;
        let media_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        // a stream is checked by its status and media type only
        let body = if media_type.as_deref() == Some("text/event-stream") {
            Vec::new()
        } else {
            match response.bytes().await {
                Ok(bytes) => bytes.to_vec(),
                Err(error) => {
                    report
                        .failures
                        .push(format!("{label}: the body did not arrive: {error}"));
                    return;
                }
            }
        };
        let text = String::from_utf8_lossy(&body);
        let short: String = text.chars().take(400).collect();

        let Some(documented) = operation
            .responses
            .get(&status.to_string())
            .or_else(|| operation.responses.get("default"))
        else {
            report.failures.push(format!(
                "{label}: status {status} is not documented (documented: {:?}); body: {short}",
                operation.responses.keys().collect::<Vec<_>>()
            ));
            return;
        };
        let documented = self.resolve(documented);
        match expect {
            Expect::Accepted => {
                let allowed = self
                    .setup
                    .also_valid
                    .get(&operation.id)
                    .is_some_and(|statuses| statuses.contains(&status));
                if !(matches!(status, 200..=299 | 401 | 403 | 404 | 409 | 429) || allowed) {
                    report.failures.push(format!(
                        "{label}: a valid request was refused with {status}: {short}"
                    ));
                }
            }
            Expect::Refused => {
                if !(400..=499).contains(&status) {
                    report
                        .failures
                        .push(format!("{label}: accepted with {status}, should be a 4xx"));
                }
            }
            Expect::Status(expected) => {
                if status != expected {
                    report.failures.push(format!(
                        "{label}: answered {status}, should be {expected}: {short}"
                    ));
                }
            }
        }
        if let Some(content) = documented["content"].as_object() {
            let Some(media_type) = media_type else {
                if !content.is_empty() {
                    report
                        .failures
                        .push(format!("{label}: {status} came without a content type"));
                }
                return;
            };
            let Some(declared) = content.get(&media_type) else {
                report.failures.push(format!(
                    "{label}: {status} came as {media_type}, documented as {:?}",
                    content.keys().collect::<Vec<_>>()
                ));
                return;
            };
            if media_type == "text/event-stream" {
                return;
            }
            let value = if media_type.ends_with("json") {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(value) => value,
                    Err(error) => {
                        report.failures.push(format!(
                            "{label}: the {media_type} body is not JSON: {error}"
                        ));
                        return;
                    }
                }
            } else {
                Value::String(text.clone().into_owned())
            };
            if let Err(error) = self.valid(&declared["schema"], &value) {
                report.failures.push(format!(
                    "{label}: the {status} body does not match its schema: {error}; body: {short}"
                ));
            }
            if status == 422
                && let Some((_, Some(field))) = &case
            {
                let named = value["errors"].as_array().is_some_and(|errors| {
                    errors.iter().any(|e| {
                        e["field"].as_str().is_some_and(|f| {
                            f.eq_ignore_ascii_case(field)
                                || f.starts_with(&format!("{field}["))
                                || f.starts_with(&format!("{field}."))
                        })
                    })
                });
                if !named {
                    report
                        .failures
                        .push(format!("{label}: the 422 does not name `{field}`: {short}"));
                }
            }
        } else if !body.is_empty() && status != 101 {
            report.failures.push(format!(
                "{label}: {status} has a body the document does not describe: {short}"
            ));
        }
        if (400..=599).contains(&status) && !media_type_is(&documented, "application/problem+json")
        {
            report.failures.push(format!(
                "{label}: error {status} is not documented as application/problem+json"
            ));
        }
    }

    /// Methods a path does not have are 405, with `Allow` and a problem.
    async fn unknown_methods(
        &self,
        template: &str,
        item: &Map<String, Value>,
        report: &mut Report,
    ) {
        let path = template
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    segment.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in METHODS {
            if item.contains_key(method) {
                continue;
            }
            let method: reqwest::Method = method.to_uppercase().parse().expect("an HTTP method");
            report.requests += 1;
            let response = match self
                .client
                .request(method.clone(), format!("{}{path}", self.base))
                .send()
                .await
            {
                Ok(response) => response,
                Err(error) => {
                    report
                        .failures
                        .push(format!("{method} {template}: no answer: {error}"));
                    continue;
                }
            };
            let status = response.status().as_u16();
            *report.statuses.entry(status).or_default() += 1;
            let allow = response.headers().get(reqwest::header::ALLOW).cloned();
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if status != 405 {
                report.failures.push(format!(
                    "{method} {template}: answered {status}, should be 405"
                ));
            } else if allow.is_none() {
                report
                    .failures
                    .push(format!("{method} {template}: 405 without an Allow header"));
            }
            if !content_type.starts_with("application/problem+json") {
                report.failures.push(format!(
                    "{method} {template}: {status} came as {content_type}, not problem+json"
                ));
            }
        }
    }
}

fn media_type_is(response: &Value, media_type: &str) -> bool {
    response["content"]
        .as_object()
        .is_some_and(|content| content.contains_key(media_type))
}

/// Values that break `schema`'s constraints, one constraint each, with what they break.
fn violating_values(checker: &Checker<'_>, schema: &Value) -> Vec<(String, Value)> {
    let schema = checker.resolve(schema);
    let mut values: Vec<(String, Value)> = Vec::new();
    let kinds = types(&schema);
    let is = |kind: &str| kinds.iter().any(|k| k == kind);
    if is("string") {
        if !is("integer") && !is("number") {
            values.push(("of the wrong type".to_owned(), json!(42)));
        }
        if let Some(min) = schema["minLength"].as_u64().filter(|m| *m > 0) {
            values.push((
                format!("shorter than {min}"),
                json!("a".repeat(usize::try_from(min).unwrap_or(1) - 1)),
            ));
        }
        if let Some(max) = schema["maxLength"].as_u64() {
            values.push((
                format!("longer than {max}"),
                json!("a".repeat(usize::try_from(max).unwrap_or(0) + 1)),
            ));
        }
        if schema.get("pattern").is_some() {
            let pattern_only = json!({"pattern": schema["pattern"]});
            let candidates = [
                "",
                " ",
                "a b",
                "-x",
                "\u{0}",
                "\u{1b}[0m",
                "a..b",
                "ü",
                "x/",
                "not-valid",
                "x.lock",
            ];
            if let Some(bad) = candidates
                .into_iter()
                .find(|c| checker.valid(&pattern_only, &json!(c)).is_err())
            {
                values.push((format!("not matching its pattern ({bad:?})"), json!(bad)));
            }
        }
        match schema["format"].as_str() {
            Some("uuid") => values.push(("not a UUID".to_owned(), json!("not-a-uuid"))),
            Some("date-time") => values.push(("not a date-time".to_owned(), json!("yesterday"))),
            _ => {}
        }
    }
    if is("integer") {
        values.push(("of the wrong type".to_owned(), json!("x")));
        values.push(("not a whole number".to_owned(), json!(1.5)));
        if let Some(min) = schema["minimum"].as_i64() {
            values.push((format!("below {min}"), json!(min - 1)));
        }
        if let Some(max) = schema["maximum"].as_i64() {
            // i64::MAX (a limit that fits a signed ledger column) is exceeded as an unsigned
            let above = max.checked_add(1).map_or_else(
                || json!(u64::try_from(max).unwrap_or(0) + 1),
                |next| json!(next),
            );
            values.push((format!("above {max}"), above));
        }
    }
    if is("array") {
        values.push(("of the wrong type".to_owned(), json!("x")));
        if let Some(max) = schema["maxItems"].as_u64() {
            let item = checker.resolve(&schema["items"]);
            let example = ["a", "main", "x"]
                .into_iter()
                .map(Value::from)
                .find(|v| checker.valid(&item, v).is_ok())
                .unwrap_or_else(|| json!("a"));
            let items = vec![example; usize::try_from(max).unwrap_or(0) + 1];
            values.push((format!("with more than {max} items"), Value::Array(items)));
        }
        for (what, value) in violating_values(checker, &schema["items"]) {
            values.push((format!("with an item {what}"), json!([value])));
        }
    }
    if let Some(options) = schema["enum"].as_array() {
        let bad = json!("not-a-member");
        if !options.contains(&bad) {
            values.push(("not one of its values".to_owned(), bad));
        }
    }
    if !is("null") && !kinds.is_empty() && !is("object") {
        values.push(("null".to_owned(), Value::Null));
    }
    // keep only what the schema really refuses (a value may be valid by another branch)
    values
        .into_iter()
        .filter(|(_, value)| checker.valid(&schema, value).is_err())
        .collect()
}

/// What a parameter's text means to a server reading it by its schema: a number or a boolean
/// when the schema allows one and the text is one, else the text.
fn wire_value(schema: &Value, text: &str) -> Value {
    let kinds = types(schema);
    let allows = |kind: &str| kinds.iter().any(|k| k == kind);
    if (allows("integer") || allows("number"))
        && let Ok(number) = serde_json::from_str::<serde_json::Number>(text)
    {
        return Value::Number(number);
    }
    if allows("boolean") && (text == "true" || text == "false") {
        return Value::Bool(text == "true");
    }
    Value::String(text.to_owned())
}

/// The JSON types a schema names (`type` as a string or a list).
fn types(schema: &Value) -> Vec<String> {
    match &schema["type"] {
        Value::String(kind) => vec![kind.clone()],
        Value::Array(kinds) => kinds
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
        _ if schema["enum"].is_array() => vec!["string".to_owned()],
        _ => Vec::new(),
    }
}

fn required(schema: &Value) -> Vec<String> {
    schema["required"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn json_body(value: &Value) -> (String, Vec<u8>) {
    (
        "application/json".to_owned(),
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// Percent-encodes a path segment (the violations put any text there).
fn encode_path(value: &str) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    if encoded.is_empty() {
        // an empty segment routes elsewhere: send something that is surely not a UUID
        encoded.push_str("%20");
    }
    encoded
}

/// Asserts that the checked-in document at `path` is `document` as generated now, pretty-printed
/// with a final newline; with `CANOPY_UPDATE_OPENAPI=1` it writes the file instead.
/// `regenerate` is the command the failure tells to run.
pub fn assert_checked_in(path: &str, document: &impl serde::Serialize, regenerate: &str) {
    let generated = serde_json::to_string_pretty(document).expect("a JSON document") + "\n";
    if std::env::var("CANOPY_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(path, &generated).expect("write the document");
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{path} is stale: run `CANOPY_UPDATE_OPENAPI=1 {regenerate}` and commit it"
    );
}

/// Asserts that every `$ref` of an OpenAPI document points at something the document defines.
pub fn assert_every_reference_defined(doc: &Value) {
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(object) => {
                if let Some(reference) = object.get("$ref").and_then(|r| r.as_str()) {
                    found.push(reference);
                }
                object.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(doc, &mut found);
    assert!(!found.is_empty());
    for reference in found {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference} is not local"));
        assert!(
            doc.pointer(pointer).is_some(),
            "{reference} is referenced but not defined"
        );
    }
}

/// Asserts that every answer of an OpenAPI document is described (OpenAPI requires it; client
/// generators refuse a document without) and every error answer is problem+json.
pub fn assert_every_answer_described_and_errors_problem_json(doc: &Value) {
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                assert!(
                    response["description"]
                        .as_str()
                        .is_some_and(|d| !d.trim().is_empty()),
                    "{method} {path} {status} has no description"
                );
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        response["content"]["application/problem+json"]["schema"]["$ref"]
                            == "#/components/schemas/Problem",
                        "{method} {path} {status} is not problem+json"
                    );
                }
            }
        }
    }
}
