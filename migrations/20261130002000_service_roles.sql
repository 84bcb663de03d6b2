-- The services' least rights, as two group roles a deployment grants to its login roles
-- (docs/security.md): whoever applies the migrations (`canopy migrate`) owns every table and
-- is the only one with DDL rights.
--
--   canopy_reader: query-api. Reads the read models, and the event store (live streams'
--                  history, the workspace of an aggregate); checks the applied migrations.
--   canopy_writer: command-api, the relay, the agent runner. Reads and writes rows, never
--                  the schema.
--
-- The projectors rebuild read models by creating and swapping tables (DDL): they run as the
-- migrating role. Roles are cluster-wide, so they may exist already.
DO
$$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'canopy_reader') THEN
        CREATE ROLE canopy_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'canopy_writer') THEN
        CREATE ROLE canopy_writer NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA read TO canopy_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA read TO canopy_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA read GRANT SELECT ON TABLES TO canopy_reader;
GRANT SELECT ON events, _sqlx_migrations TO canopy_reader;

GRANT USAGE ON SCHEMA read TO canopy_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO canopy_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA read TO canopy_writer;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO canopy_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO canopy_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO canopy_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA read
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO canopy_writer;
-- neither may create anything (PostgreSQL < 15 lets every role create in schema public)
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM canopy_writer;
