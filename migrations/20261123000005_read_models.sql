-- Read models, materialised by the projectors from the event stream into schema `read`.
-- Every column is a pure function of the events (times are events' recorded_at, never now()),
-- so a rebuild from the event store ends identical, row for row.
-- Tables belong to one projection each; a rebuild recreates a projection's tables (with
-- CREATE TABLE ... (LIKE ... INCLUDING ALL)) in a shadow schema and swaps them in.

CREATE SCHEMA read;

-- Projection "sessions" ------------------------------------------------------------------------

CREATE TABLE read.sessions
(
    session_id           uuid PRIMARY KEY,
    workspace_id         text        NOT NULL,
    feature_id           uuid,
    title                text        NOT NULL,
    repository_url       text        NOT NULL,
    base_branch          text        NOT NULL,
    session_branch       text        NOT NULL,
    -- active | completed | failed | archived
    status               text        NOT NULL,
    started_by           text        NOT NULL,
    started_at           timestamptz NOT NULL,
    finished_at          timestamptz,
    archived_at          timestamptz,
    failure_reason       text,
    -- [{"user_id", "name", "role"}] in joining order
    participants         jsonb       NOT NULL DEFAULT '[]',
    participant_count    integer     NOT NULL DEFAULT 0,
    queue_length         integer     NOT NULL DEFAULT 0,
    running_prompt_id    uuid,
    prompt_count         integer     NOT NULL DEFAULT 0,
    tool_execution_count integer     NOT NULL DEFAULT 0,
    checkpoint_count     integer     NOT NULL DEFAULT 0,
    sandbox_id           text,
    opencode_session_id  text,
    last_activity_at     timestamptz NOT NULL,
    version              bigint      NOT NULL
);
CREATE INDEX sessions_workspace ON read.sessions (workspace_id, last_activity_at DESC);
CREATE INDEX sessions_feature ON read.sessions (feature_id) WHERE feature_id IS NOT NULL;

CREATE TABLE read.prompts
(
    prompt_id          uuid PRIMARY KEY,
    session_id         uuid        NOT NULL,
    workspace_id       text        NOT NULL,
    author_id          text        NOT NULL,
    author_name        text        NOT NULL,
    -- the first 280 characters of the prompt
    text_preview       text        NOT NULL,
    text_length        integer     NOT NULL,
    -- queued | running | completed | failed | cancelled
    status             text        NOT NULL,
    -- 1-based place in the session's queue while queued
    queue_position     integer,
    submitted_sequence bigint      NOT NULL,
    submitted_at       timestamptz NOT NULL,
    started_at         timestamptz,
    finished_at        timestamptz,
    summary            text,
    failure_reason     text,
    cancelled_by       text
);
CREATE INDEX prompts_session ON read.prompts (session_id, submitted_sequence);
CREATE INDEX prompts_author ON read.prompts (workspace_id, author_id, submitted_at);

CREATE TABLE read.plans
(
    plan_id             uuid PRIMARY KEY,
    prompt_id           uuid        NOT NULL,
    session_id          uuid        NOT NULL,
    workspace_id        text        NOT NULL,
    -- pending | approved | rejected
    status              text        NOT NULL,
    summary             text        NOT NULL,
    steps               jsonb       NOT NULL,
    proposed_by         text        NOT NULL,
    proposed_at         timestamptz NOT NULL,
    reviewer_id         text,
    reviewer_name       text,
    review_comment      text,
    decided_at          timestamptz,
    time_to_decision_ms bigint
);
CREATE INDEX plans_session ON read.plans (session_id, proposed_at);

CREATE TABLE read.tool_approvals
(
    request_id    uuid PRIMARY KEY,
    session_id    uuid        NOT NULL,
    workspace_id  text        NOT NULL,
    prompt_id     uuid        NOT NULL,
    call_id       text        NOT NULL,
    tool          text        NOT NULL,
    input_summary text        NOT NULL,
    -- pending | granted | denied
    status        text        NOT NULL,
    requested_at  timestamptz NOT NULL,
    decided_at    timestamptz,
    reviewer_id   text,
    reviewer_name text,
    comment       text
);
CREATE INDEX tool_approvals_session ON read.tool_approvals (session_id, requested_at);

CREATE TABLE read.tool_executions
(
    event_id            uuid PRIMARY KEY,
    session_id          uuid        NOT NULL,
    workspace_id        text        NOT NULL,
    prompt_id           uuid        NOT NULL,
    call_id             text        NOT NULL,
    tool                text        NOT NULL,
    -- plan | build
    phase               text        NOT NULL,
    -- completed | failed | denied
    status              text        NOT NULL,
    duration_ms         bigint      NOT NULL,
    input_summary       text        NOT NULL,
    output_summary      text        NOT NULL,
    -- the approval asked for this call, if any
    approval_request_id uuid,
    approval_status     text,
    executed_at         timestamptz NOT NULL,
    sequence            bigint      NOT NULL
);
CREATE INDEX tool_executions_session ON read.tool_executions (session_id, sequence);
CREATE INDEX tool_executions_tool ON read.tool_executions (workspace_id, tool);

CREATE TABLE read.checkpoints
(
    checkpoint_id    uuid PRIMARY KEY,
    session_id       uuid        NOT NULL,
    workspace_id     text        NOT NULL,
    prompt_id        uuid,
    label            text,
    commit_sha       text        NOT NULL,
    files_changed    jsonb       NOT NULL,
    -- auto | manual
    trigger          text        NOT NULL,
    taken_at         timestamptz NOT NULL,
    restore_count    integer     NOT NULL DEFAULT 0,
    last_restored_at timestamptz
);
CREATE INDEX checkpoints_session ON read.checkpoints (session_id, taken_at);

CREATE TABLE read.usage_daily
(
    session_id     uuid   NOT NULL,
    workspace_id   text   NOT NULL,
    -- the author of the prompt the usage was recorded for
    user_id        text   NOT NULL,
    day            date   NOT NULL,
    tokens_in      bigint NOT NULL,
    tokens_out     bigint NOT NULL,
    cost_micro_usd bigint NOT NULL,
    PRIMARY KEY (session_id, user_id, day)
);
CREATE INDEX usage_daily_workspace ON read.usage_daily (workspace_id, day);

-- per-aggregate checkpoint of the projection: the last sequence applied
CREATE TABLE read.sessions_positions
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Projection "timeline" ------------------------------------------------------------------------

CREATE TABLE read.session_timeline
(
    event_id     uuid PRIMARY KEY,
    session_id   uuid        NOT NULL,
    workspace_id text        NOT NULL,
    sequence     bigint      NOT NULL,
    event_type   text        NOT NULL,
    actor_id     text        NOT NULL,
    actor_name   text        NOT NULL,
    recorded_at  timestamptz NOT NULL,
    -- one line a UI can show as is
    summary      text        NOT NULL,
    data         jsonb       NOT NULL,
    UNIQUE (session_id, sequence)
);

CREATE TABLE read.timeline_positions
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Projection "features" ------------------------------------------------------------------------

CREATE TABLE read.features
(
    feature_id     uuid PRIMARY KEY,
    workspace_id   text        NOT NULL,
    title          text        NOT NULL,
    description    text        NOT NULL,
    -- active | completed
    status         text        NOT NULL,
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL,
    completed_at   timestamptz,
    session_count  integer     NOT NULL DEFAULT 0,
    learning_count integer     NOT NULL DEFAULT 0,
    decision_count integer     NOT NULL DEFAULT 0,
    version        bigint      NOT NULL
);
CREATE INDEX features_workspace ON read.features (workspace_id, created_at);

CREATE TABLE read.feature_sessions
(
    feature_id  uuid        NOT NULL,
    session_id  uuid        NOT NULL,
    attached_by text        NOT NULL,
    attached_at timestamptz NOT NULL,
    PRIMARY KEY (feature_id, session_id)
);

CREATE TABLE read.feature_learnings
(
    learning_id    uuid PRIMARY KEY,
    feature_id     uuid        NOT NULL,
    session_id     uuid,
    text           text        NOT NULL,
    shared_by      text        NOT NULL,
    shared_by_name text        NOT NULL,
    shared_at      timestamptz NOT NULL
);
CREATE INDEX feature_learnings_feature ON read.feature_learnings (feature_id, shared_at);

CREATE TABLE read.feature_decisions
(
    decision_id uuid PRIMARY KEY,
    feature_id  uuid        NOT NULL,
    title       text        NOT NULL,
    rationale   text        NOT NULL,
    recorded_by text        NOT NULL,
    recorded_at timestamptz NOT NULL
);
CREATE INDEX feature_decisions_feature ON read.feature_decisions (feature_id, recorded_at);

CREATE TABLE read.features_positions
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Operations ------------------------------------------------------------------------------------

-- Events a projection could not apply, kept with the error; an aggregate with a parked event
-- has its later events parked too (reason 'blocked') until it is resolved.
CREATE TABLE read.parked_events
(
    projection     text        NOT NULL,
    event_id       uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    error          text        NOT NULL,
    deliveries     integer     NOT NULL,
    envelope       jsonb       NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    PRIMARY KEY (projection, event_id)
);
CREATE INDEX parked_events_open ON read.parked_events (projection, aggregate_type, aggregate_id)
    WHERE resolved_at IS NULL;

-- Which projections have been built from the event store, at which definition version.
CREATE TABLE read.projection_state
(
    projection         text PRIMARY KEY,
    definition_version integer     NOT NULL,
    built_at           timestamptz NOT NULL
);
