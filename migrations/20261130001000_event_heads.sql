-- Chain heads outside the events table: each stream's latest sequence and hash, written by a
-- trigger at the commit of the appending transaction (so for every writer). Deleting a stream's newest events,
-- or re-hashing its chain after an edit, leaves the events table consistent with itself but not
-- with its head. The relay also publishes each event's hash (header `canopy-chain-hash`), a copy
-- outside the database.

CREATE TABLE event_heads
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 1),
    hash           bytea  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

INSERT INTO event_heads (aggregate_type, aggregate_id, sequence, hash)
SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, sequence, hash
FROM events
ORDER BY aggregate_type, aggregate_id, sequence DESC;

-- Deferred to commit, still inside the appending transaction: each firing brings the head to the
-- stream's newest event, so the first firing of a stream writes it and the others find it done (a
-- transaction appending many events to one stream updates its head row once, not once per event).
CREATE FUNCTION canopy_events_record_head() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    newest_sequence bigint;
    newest_hash     bytea;
BEGIN
    IF EXISTS (SELECT 1 FROM event_heads h
                WHERE h.aggregate_type = NEW.aggregate_type AND h.aggregate_id = NEW.aggregate_id
                  AND h.sequence >= NEW.sequence) THEN
        RETURN NULL;
    END IF;
    SELECT e.sequence, e.hash INTO newest_sequence, newest_hash
    FROM events e
    WHERE e.aggregate_type = NEW.aggregate_type AND e.aggregate_id = NEW.aggregate_id
    ORDER BY e.sequence DESC
    LIMIT 1;
    INSERT INTO event_heads (aggregate_type, aggregate_id, sequence, hash)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, newest_sequence, newest_hash)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
        SET sequence = EXCLUDED.sequence, hash = EXCLUDED.hash
        WHERE event_heads.sequence < EXCLUDED.sequence;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER events_record_head
    AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION canopy_events_record_head();

-- A head only moves forward, and only with an append.
CREATE FUNCTION canopy_event_heads_guard() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.aggregate_type = OLD.aggregate_type
        AND NEW.aggregate_id = OLD.aggregate_id AND NEW.sequence > OLD.sequence
        AND EXISTS (SELECT 1 FROM events e
                     WHERE e.aggregate_type = NEW.aggregate_type
                       AND e.aggregate_id = NEW.aggregate_id
                       AND e.sequence = NEW.sequence AND e.hash = NEW.hash) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'chain heads only move forward with an append'
        USING ERRCODE = 'P0001', HINT = 'canopy_event_heads_append_only';
END
$$;

CREATE TRIGGER event_heads_guard
    BEFORE UPDATE OR DELETE ON event_heads
    FOR EACH ROW EXECUTE FUNCTION canopy_event_heads_guard();

CREATE TRIGGER event_heads_no_truncate
    BEFORE TRUNCATE ON event_heads
    FOR EACH STATEMENT EXECUTE FUNCTION canopy_event_heads_guard();
