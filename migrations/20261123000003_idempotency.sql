-- Idempotency keys of command-api: one row per (caller, key), kept at least 24 hours.
-- Written in transactions of their own, never in an append's transaction.
CREATE TABLE idempotency_keys
(
    caller          text        NOT NULL,
    key             text        NOT NULL,
    -- SHA-256 of the method, path and canonical JSON body of the first request
    request_hash    bytea       NOT NULL,
    state           text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    response_status smallint,
    response_body   jsonb,
    -- an in-flight request's lease: past it, a crashed request's key may be taken over
    locked_until    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (caller, key),
    CHECK (state = 'in_flight' OR (response_status IS NOT NULL AND response_body IS NOT NULL))
);

CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

-- finds what a request that crashed mid-flight already appended under its key
CREATE INDEX events_idempotency_key ON events ((metadata ->> 'actor_id'), (metadata ->> 'idempotency_key'))
    WHERE metadata ? 'idempotency_key';
