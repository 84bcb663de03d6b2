-- Which agent runner drives which session. One driver per session at a time: a runner holds a
-- session's row while it works on it and renews `expires_at`; when a runner dies, another takes
-- the session over once the lease has expired. Rows exist only while a session has work.
CREATE TABLE runner_leases
(
    session_id      text        PRIMARY KEY,
    owner           text        NOT NULL,
    expires_at      timestamptz NOT NULL,
    -- the prompt whose build phase the owner is running: a runner taking the session over after
    -- the owner died fails that prompt with a clear reason instead of building it twice
    building_prompt uuid,
    acquired_at     timestamptz NOT NULL DEFAULT now(),
    renewed_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX runner_leases_expires_at ON runner_leases (expires_at);
