-- Listing order for the read models, and the analysts' read-only role.
--
-- Rows that list endpoints page through carry the (transaction id, position) of the event that
-- created them: the relay's order, in which the projectors apply events. A row created later is
-- always after every row created before it, so a keyset cursor over these two columns returns
-- every row once while rows are being added. Both come from the event, so a rebuild ends
-- identical. Existing rows are filled from the event store.

ALTER TABLE read.sessions ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.prompts ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.plans ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.tool_approvals ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.tool_executions ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.checkpoints ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.session_timeline ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;
ALTER TABLE read.features ADD COLUMN created_xid bigint NOT NULL DEFAULT 0, ADD COLUMN created_position bigint NOT NULL DEFAULT 0;

CREATE INDEX sessions_order ON read.sessions (workspace_id, created_xid, created_position);
CREATE INDEX prompts_order ON read.prompts (workspace_id, created_xid, created_position);
CREATE INDEX plans_order ON read.plans (workspace_id, created_xid, created_position);
CREATE INDEX tool_approvals_order ON read.tool_approvals (workspace_id, created_xid, created_position);
CREATE INDEX tool_executions_order ON read.tool_executions (workspace_id, created_xid, created_position);
CREATE INDEX checkpoints_order ON read.checkpoints (workspace_id, created_xid, created_position);
CREATE INDEX session_timeline_order ON read.session_timeline (session_id, created_xid, created_position);
CREATE INDEX features_order ON read.features (workspace_id, created_xid, created_position);

-- The projections' definitions changed: they are rebuilt from the event store at start-up.
DELETE FROM read.projection_state;

-- Analysts: SELECT on the read models, nothing else. Roles are cluster-wide, so it may exist.
DO
$$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'canopy_analyst') THEN
        CREATE ROLE canopy_analyst NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA read TO canopy_analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA read TO canopy_analyst;
ALTER DEFAULT PRIVILEGES IN SCHEMA read GRANT SELECT ON TABLES TO canopy_analyst;
