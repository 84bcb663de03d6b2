-- Erasure that cannot forge. The only payload change the guard allows is replacing an event's
-- payload by its canonical tombstone (its personal fields set to "[erased]", everything else as
-- it was), once, in a transaction that set canopy.erasure = on and first appended a
-- PersonalDataErased event (aggregate type 'erasure') listing this event with its original
-- payload digest and the tombstone's digest. Verifiers accept an erased payload only when such an
-- erasure event covers it with exactly that digest (crates/event-store/src/chain.rs).

-- Whose personal data an event holds: the user id an erasure for that person selects it by.
CREATE FUNCTION canopy_erasure_subject(p_event_type text, p_payload jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$
SELECT CASE p_event_type
           WHEN 'PromptSubmitted' THEN p_payload -> p_event_type ->> 'author_id'
           WHEN 'ParticipantJoined' THEN p_payload -> p_event_type ->> 'user_id'
           WHEN 'LearningShared' THEN p_payload -> p_event_type ->> 'shared_by'
           END
$$;

-- The personal fields of each event type (every version): the one list of what an erasure
-- replaces.
CREATE FUNCTION canopy_personal_fields(p_event_type text, p_event_version text) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$
SELECT CASE p_event_type
           WHEN 'PromptSubmitted' THEN ARRAY ['author_name', 'author_email', 'text']
           WHEN 'ParticipantJoined' THEN ARRAY ['name']
           WHEN 'LearningShared' THEN ARRAY ['text', 'shared_by_name']
           ELSE ARRAY []::text[]
           END
$$;

-- The canonical tombstone of a payload: each personal field that holds a string becomes
-- "[erased]"; the payload is otherwise unchanged (so the event still replays).
CREATE FUNCTION canopy_erasure_tombstone(p_event_type text, p_event_version text, p_payload jsonb)
    RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS
$$
DECLARE
    body  jsonb := p_payload -> p_event_type;
    field text;
BEGIN
    IF body IS NULL OR jsonb_typeof(body) <> 'object' THEN
        RETURN p_payload;
    END IF;
    FOREACH field IN ARRAY canopy_personal_fields(p_event_type, p_event_version) LOOP
        IF jsonb_typeof(body -> field) = 'string' THEN
            body := jsonb_set(body, ARRAY [field], '"[erased]"'::jsonb);
        END IF;
    END LOOP;
    RETURN jsonb_build_object(p_event_type, body);
END
$$;

-- Events are append-only; an erasure may change only payload (to its tombstone) and erased_at.
CREATE OR REPLACE FUNCTION canopy_events_guard() RETURNS trigger
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
             OLD.payload_digest, OLD.event_digest, OLD.prev_hash, OLD.hash)
        AND OLD.erased_at IS NULL AND NEW.erased_at IS NOT NULL
        AND NEW.payload = canopy_erasure_tombstone(OLD.event_type, OLD.event_version, OLD.payload)
        AND EXISTS (
            SELECT 1
            FROM events e
            WHERE e.aggregate_type = 'erasure'
              AND e.event_type = 'PersonalDataErased'
              AND e.transaction_id = pg_current_xact_id()
              AND e.payload -> 'PersonalDataErased' -> 'events' @> jsonb_build_array(
                    jsonb_build_object(
                        'event_id', OLD.event_id::text,
                        'original_digest', encode(OLD.payload_digest, 'hex'),
                        'tombstone_digest', encode(canopy_payload_digest(NEW.payload), 'hex'))))
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are append-only' USING ERRCODE = 'P0001', HINT = 'canopy_events_append_only';
END
$$;
