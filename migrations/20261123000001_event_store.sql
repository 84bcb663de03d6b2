-- The event store: postgres-es's `events` and `snapshots` tables, plus the columns, triggers and
-- functions that make every append carry what auditors and the relay need. Everything here runs
-- inside the appending transaction, so it is atomic with the append whoever the writer is.

CREATE TABLE events
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 1),
    event_type     text   NOT NULL,
    event_version  text   NOT NULL,
    payload        jsonb  NOT NULL,
    metadata       jsonb  NOT NULL,
    -- added by Canopy (postgres-es neither writes nor reads these)
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- position and transaction_id are set by the append trigger, not by column defaults: a
    -- default runs before the trigger, and both pg_current_xact_id() and nextval() (which
    -- WAL-logs every 32nd value) can assign the transaction id before the trigger could check
    -- that this insert is the transaction's first write
    position       bigint      NOT NULL,
    transaction_id xid8        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    payload_digest bytea       NOT NULL,
    event_digest   bytea       NOT NULL,
    prev_hash      bytea       NOT NULL,
    hash           bytea       NOT NULL,
    erased_at      timestamptz,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_position_key UNIQUE (position),
    CONSTRAINT events_metadata_complete CHECK (
        metadata ?& ARRAY ['actor_id', 'actor_name', 'actor_kind', 'correlation_id', 'request_id'])
);

-- the global position: a bigserial in all but name (see above)
CREATE SEQUENCE events_position_seq AS bigint OWNED BY events.position;

-- the relay reads committed rows below the snapshot horizon in (transaction id, position) order
CREATE INDEX events_relay_order ON events (transaction_id, position);
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE TABLE snapshots
(
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    taken_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Digest of an event's immutable fields. The payload enters only as its digest, so erasing a
-- payload later (keeping payload_digest) leaves the chain verifiable. jsonb_build_array gives an
-- unambiguous encoding of the field list.
CREATE FUNCTION canopy_event_digest(
    p_event_id uuid, p_aggregate_type text, p_aggregate_id text, p_sequence bigint,
    p_event_type text, p_event_version text, p_recorded_at timestamptz,
    p_payload_digest bytea, p_metadata jsonb) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$
SELECT sha256(convert_to(jsonb_build_array(
        p_event_id::text, p_aggregate_type, p_aggregate_id, p_sequence, p_event_type,
        p_event_version, to_char(p_recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        encode(p_payload_digest, 'hex'), p_metadata)::text, 'UTF8'))
$$;

CREATE FUNCTION canopy_payload_digest(p_payload jsonb) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$
SELECT sha256(convert_to(p_payload::text, 'UTF8'))
$$;

CREATE FUNCTION canopy_events_before_insert() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    assigned  xid8 := pg_current_xact_id_if_assigned();
    appending text := current_setting('canopy.appending_xid', true);
    previous  bytea;
BEGIN
    -- Invariant: the first event insert is the first write of its transaction. A transaction that
    -- wrote before it would hold a transaction id older than the aggregate state it loaded, and the
    -- relay, which orders by (transaction id, position), could then publish it before an event it
    -- follows.
    IF assigned IS NOT NULL AND appending IS DISTINCT FROM assigned::text THEN
        RAISE EXCEPTION 'an event insert must be the first write of its transaction'
            USING ERRCODE = 'P0001', HINT = 'canopy_event_not_first_write';
    END IF;
    NEW.transaction_id := pg_current_xact_id();
    NEW.position := nextval('events_position_seq');
    PERFORM set_config('canopy.appending_xid', NEW.transaction_id::text, true);

    IF NEW.sequence = 1 THEN
        previous := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    ELSE
        SELECT e.hash INTO previous
        FROM events e
        WHERE e.aggregate_type = NEW.aggregate_type
          AND e.aggregate_id = NEW.aggregate_id
          AND e.sequence = NEW.sequence - 1;
        IF previous IS NULL THEN
            RAISE EXCEPTION 'event % of %/% has no predecessor', NEW.sequence, NEW.aggregate_type,
                NEW.aggregate_id USING ERRCODE = 'P0001', HINT = 'canopy_event_sequence_gap';
        END IF;
    END IF;

    NEW.payload_digest := canopy_payload_digest(NEW.payload);
    NEW.event_digest := canopy_event_digest(NEW.event_id, NEW.aggregate_type, NEW.aggregate_id,
        NEW.sequence, NEW.event_type, NEW.event_version, NEW.recorded_at, NEW.payload_digest,
        NEW.metadata);
    NEW.prev_hash := previous;
    NEW.hash := sha256(previous || NEW.event_digest);
    NEW.erased_at := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_before_insert
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION canopy_events_before_insert();

-- Wakes the relay. Notifications are delivered at commit and identical ones within a transaction
-- are folded into one, so a multi-event append sends a single wake-up.
CREATE FUNCTION canopy_events_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('canopy_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION canopy_events_notify();

-- Events are append-only. The one sanctioned rewrite, erasing a payload, sets
-- canopy.erasure = 'on' for its transaction and may change nothing but payload and erased_at.
CREATE FUNCTION canopy_events_guard() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF TG_OP = 'UPDATE' AND current_setting('canopy.erasure', true) = 'on'
        AND (NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.event_type, NEW.event_version,
             NEW.metadata, NEW.event_id, NEW.position, NEW.transaction_id, NEW.recorded_at,
             NEW.payload_digest, NEW.event_digest, NEW.prev_hash, NEW.hash)
            IS NOT DISTINCT FROM
            (OLD.aggregate_type, OLD.aggregate_id, OLD.sequence, OLD.event_type, OLD.event_version,
             OLD.metadata, OLD.event_id, OLD.position, OLD.transaction_id, OLD.recorded_at,
             OLD.payload_digest, OLD.event_digest, OLD.prev_hash, OLD.hash) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are append-only' USING ERRCODE = 'P0001', HINT = 'canopy_events_append_only';
END
$$;

CREATE TRIGGER events_guard
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION canopy_events_guard();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION canopy_events_guard();
