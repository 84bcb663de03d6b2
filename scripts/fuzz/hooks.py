"""Schemathesis hooks for fuzzing Canopy's APIs (scripts/contract.sh loads them via SCHEMATHESIS_HOOKS).

Each hook answers one thing the generator cannot know, and nothing else; every check still runs.

- A fresh Idempotency-Key per request. The generator draws keys from a small space and sends the
  same key with different requests; the document says (and command-api's tests prove) that this is
  422 `idempotency_key_reused`. A key that breaks the documented pattern is left as drawn, so the
  negative cases for the header are still sent and must still be refused.
- A body naming a session or feature that does not exist is 422 `session_not_found` /
  `feature_not_found`, as the document says in words; no schema can say which ids exist. Such a
  "schema-valid request rejected" failure is dropped only after query-api confirms, with the same
  token, that the id named is unknown to the caller's workspace (404).
- `at_sequence` past a session's last event is 422 naming `at_sequence` (the document says so in
  words; no schema knows how long a session is). Dropped only when the sequence asked for is past
  the count the answer gives.
- A webhook target must resolve, and only to public addresses (422 `webhook_target_unresolvable`
  / `webhook_target_not_public`, documented in words): no schema can say what a name resolves to.
  Dropped only when this process, resolving the same host, confirms it does not resolve or that
  an address is not global.
- A webhook URL that matches the documented pattern but names no host or port a URL parser
  accepts is 422 `webhook_url_invalid`; dropped only when Python's parser fails on it too.
- A WebSocket endpoint answers a GET without a handshake 426 `upgrade_required` (documented): the
  generator cannot send a handshake, so that "schema-valid request rejected" is dropped; the
  handshake and the frames are checked by query-api's
  `asyncapi::every_live_frame_matches_the_asyncapi_document`. Every other check runs on it.
- Schemathesis 4.32.5's coverage phase cannot draw a header matching a pattern that needs a
  character outside [A-Za-z0-9] (Last-Event-ID `1.1`); for an optional header it then seeds the
  "default positive" case with a negative value and still labels the case positive. A "schema-valid
  request rejected" failure whose request breaks a documented header schema is that mislabel and is
  dropped: the request was not schema-valid.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
import uuid

import schemathesis

if sys.version_info < (3, 12):
    # CPython 3.11's ast.parse can raise "SystemError: AST constructor recursion depth mismatch"
    # when hypothesis parses a big module's source to describe a lambda for a strategy's repr
    # (seen with 3.11.2 and 3.11.7; fixed in later CPython). The description is only a repr, so a
    # plain one stands in; generation and checks are untouched.
    from hypothesis.internal import lambda_sources

    _describe_lambda = lambda_sources.lambda_description

    def _lambda_description(f):
        try:
            return _describe_lambda(f)
        except SystemError:
            return "lambda: <source not described>"

    lambda_sources.lambda_description = _lambda_description

IDEMPOTENCY_KEY = "idempotency-key"
QUERY_API = os.environ.get("CANOPY_FUZZ_QUERY_API", "").rstrip("/")
NOT_FOUND_CODES = {"session_not_found": "sessions", "feature_not_found": "features"}


def _header_parameters(operation):
    """The operation's documented header parameters: lowercase name -> schema."""
    found = {}
    for parameter in operation.iter_parameters():
        raw = parameter.definition
        if raw.get("in") == "header" and isinstance(raw.get("schema"), dict):
            found[raw["name"].lower()] = raw["schema"]
    return found


def _keeps(schema, value) -> bool:
    """Whether a header's text keeps what its schema promises (the keywords our documents use)."""
    if not isinstance(value, str):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    pattern = schema.get("pattern")
    if pattern is not None and re.search(pattern, value) is None:
        return False
    if "minLength" in schema and len(value) < schema["minLength"]:
        return False
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return False
    return True


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    schema = _header_parameters(case.operation).get(IDEMPOTENCY_KEY)
    for name in list(headers):
        if name.lower() == IDEMPOTENCY_KEY and schema is not None and _keeps(schema, headers[name]):
            headers[name] = str(uuid.uuid4())


def _known_to_query_api(kind: str, id_: str, authorization: str | None) -> bool:
    """True unless query-api answers 404 for this id with the request's own token."""
    if not QUERY_API or not authorization:
        return True
    request = urllib.request.Request(f"{QUERY_API}/{kind}/{id_}", headers={"Authorization": authorization})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError as error:
        return error.code != 404
    except (urllib.error.URLError, TimeoutError):
        return True


def _request_headers(response):
    request = getattr(response, "request", None)
    return dict(getattr(request, "headers", {}) or {})


DROPPED_LOG = os.environ.get("CANOPY_FUZZ_DROPPED")


def _dropped(case, response, why: str) -> bool:
    """Drops a failure, noting why in CANOPY_FUZZ_DROPPED (one JSON line each) for review."""
    if DROPPED_LOG:
        with open(DROPPED_LOG, "a", encoding="utf-8") as log:
            line = {"operation": case.operation.label, "status": response.status_code, "why": why}
            log.write(json.dumps(line) + "\n")
    return False


def _parses_as_a_target(url: str) -> bool:
    """Whether the URL gives a host and a valid port here (a pattern cannot say that much)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        _ = parts.port
        host = parts.hostname
    except ValueError:
        return False
    if not host or not parts.netloc or "[" in parts.netloc and ":" not in host:
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _confirms_target_refusal(url: str, code: str) -> bool:
    """Whether resolving the URL's host here agrees with the refusal's code."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 443
    except ValueError:
        return False
    if not host:
        return False
    try:
        # the C library's numeric forms first ("0000", "127.1"), as the server's resolver reads them
        addresses = [ipaddress.ip_address(socket.inet_aton(host))]
    except (OSError, UnicodeError, ValueError):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (UnicodeError, OSError):
            return code == "webhook_target_unresolvable"
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if code != "webhook_target_not_public":
        return False
    return any(not address.is_global for address in addresses)


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if failure.code != "ST202":
        return True
    # The request broke a documented header schema: not a positive case (see the module's doc).
    sent = {name.lower(): value for name, value in _request_headers(response).items()}
    for name, schema in _header_parameters(case.operation).items():
        if name in sent and not _keeps(schema, sent[name]):
            return _dropped(case, response, f"mislabelled positive: header {name} breaks its schema")
    try:
        problem = json.loads(response.content)
    except ValueError:
        return True
    if response.status_code == 426 and problem.get("code") == "upgrade_required":
        if case.operation.path.endswith("/ws"):
            return _dropped(case, response, "WebSocket endpoint asked without a handshake")
        return True
    if response.status_code != 422:
        return True
    for error in problem.get("errors") or []:
        counted = re.fullmatch(r"the session has (\d+) events", str(error.get("message", "")))
        asked = (case.query or {}).get("at_sequence")
        if error.get("field") == "at_sequence" and counted and isinstance(asked, int):
            if asked > int(counted.group(1)):
                return _dropped(case, response, "at_sequence past the session's last event")
            return True
    if problem.get("code") == "webhook_url_invalid":
        url = (case.body or {}).get("url") if isinstance(case.body, dict) else None
        if isinstance(url, str) and not _parses_as_a_target(url):
            return _dropped(case, response, "webhook_url_invalid: no host and port parse here either")
        return True
    if problem.get("code") in ("webhook_target_unresolvable", "webhook_target_not_public"):
        url = (case.body or {}).get("url") if isinstance(case.body, dict) else None
        if isinstance(url, str) and _confirms_target_refusal(url, problem.get("code")):
            return _dropped(case, response, f"{problem.get('code')}: confirmed by resolving the host here")
        return True
    kind = NOT_FOUND_CODES.get(problem.get("code"))
    body = case.body if isinstance(case.body, dict) else {}
    named = body.get("session_id" if kind == "sessions" else "feature_id")
    if kind is None or not isinstance(named, str):
        return True
    if _known_to_query_api(kind, named, sent.get("authorization")):
        return True
    return _dropped(case, response, f"{problem.get('code')}: query-api confirms the id is unknown")
