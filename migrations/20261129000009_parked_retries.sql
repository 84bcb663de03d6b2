-- Parked events are retried automatically with backoff (projectors/src/parked.rs): how many
-- times a retry has failed, and when the next one is due.
ALTER TABLE read.parked_events
    ADD COLUMN attempts        integer     NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now();
