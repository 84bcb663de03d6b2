-- Webhooks (issue #21): signing secrets, the delivery service's view of subscriptions, its
-- outbox of deliveries and the log of every attempt.
--
-- Secrets are never in an event: command-api writes them here in the transaction that appends
-- the subscription's (or rotation's) event, keyed by the secret version the event names.
-- query-api (canopy_reader) may read everything here but the secrets.

CREATE TABLE webhook_secrets (
    webhook_id uuid NOT NULL,
    version bigint NOT NULL,
    secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (webhook_id, version)
);

-- Kept by canopy-webhooks from the webhook events, in each subscription's sequence order
-- (`version` is the last applied sequence); query-api lists subscriptions from here. `suspended_at` is the delivery service's own
-- pause after repeated failures; a WebhookResumed event lifts it.
CREATE TABLE webhook_subscriptions (
    webhook_id uuid PRIMARY KEY,
    workspace_id text NOT NULL,
    url text NOT NULL,
    event_types text[] NOT NULL,
    description text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'paused', 'deleted')),
    secret_version bigint NOT NULL,
    secret_fingerprint text NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version bigint NOT NULL,
    -- where WebhookSubscribed is in relay order: only later events are delivered (a replayed
    -- stream never sends a subscription what happened before it)
    subscribed_transaction_id bigint NOT NULL,
    subscribed_position bigint NOT NULL,
    suspended_at timestamptz,
    suspended_reason text,
    dead_streak integer NOT NULL DEFAULT 0
);
CREATE INDEX webhook_subscriptions_workspace ON webhook_subscriptions (workspace_id, created_at, webhook_id);

-- One row per (subscription, event): the outbox. Delivered in relay order
-- (transaction_id, position) per subscription; the body is built from the event store at each
-- attempt, so an erased payload is never sent afterwards.
CREATE TABLE webhook_deliveries (
    webhook_id uuid NOT NULL,
    event_id uuid NOT NULL,
    message_id text NOT NULL,
    workspace_id text NOT NULL,
    event_type text NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    sequence bigint NOT NULL,
    transaction_id bigint NOT NULL,
    position bigint NOT NULL,
    recorded_at timestamptz NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    series integer NOT NULL DEFAULT 1,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    queued_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    last_status_code integer,
    last_error text,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, transaction_id, position)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (webhook_id, transaction_id DESC, position DESC);

-- Every attempt: when, what answered (status code or error) and how long it took.
CREATE TABLE webhook_attempts (
    id bigserial PRIMARY KEY,
    webhook_id uuid NOT NULL,
    event_id uuid NOT NULL,
    series integer NOT NULL,
    attempt integer NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    status_code integer,
    latency_ms integer NOT NULL,
    error text,
    outcome text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'dead'))
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (webhook_id, event_id, id);

GRANT SELECT ON webhook_subscriptions, webhook_deliveries, webhook_attempts TO canopy_reader;
