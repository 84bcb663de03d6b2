-- Idempotency keys are completed inside the append's transaction, fenced by a claim token.
--
-- Every claim of a key (a fresh one, or a takeover once its lease ran out) writes a new random
-- claim_token. The transaction that appends a command's events also sets the key to completed
-- with the answer, but only while the row still carries the token of the claim that ran the
-- command; a request whose claim was taken over rolls its append back. So a key is completed if
-- and only if its events committed, and a key's events are appended once, however slow the
-- request and whatever fails after its commit.
ALTER TABLE idempotency_keys
    ADD COLUMN claim_token uuid;

COMMENT ON COLUMN idempotency_keys.claim_token IS
    'the claim that may complete an in-flight key; a new one for every claim or takeover';

-- Keys left in flight by a request that appended and died before recording its answer. Before
-- this migration such a key was recovered from the events carrying it in their metadata (and
-- the answer planned at claim time, kept in response_body); that recovery is gone, so complete
-- them here from their events, with the answer the recovery would have given.
UPDATE idempotency_keys k
SET state           = 'completed',
    response_status = (k.response_body ->> 'status')::smallint,
    response_body   = jsonb_strip_nulls(jsonb_build_object(
            'aggregate_type', k.response_body ->> 'aggregate_type',
            'aggregate_id', k.response_body ->> 'aggregate_id',
            'version', appended.version,
            'event_ids', appended.event_ids,
            'id', k.response_body -> 'id'))
FROM (SELECT k2.caller, k2.key, max(e.sequence) AS version,
             jsonb_agg(e.event_id ORDER BY e.sequence) AS event_ids
      FROM idempotency_keys k2
               JOIN events e
                    ON e.aggregate_type = k2.response_body ->> 'aggregate_type'
                        AND e.aggregate_id = k2.response_body ->> 'aggregate_id'
                        AND e.metadata ->> 'idempotency_key' = k2.key
                        -- the caller is 'user:<workspace>:<actor_id>' or 'service:<actor_id>'
                        AND right(k2.caller, length(e.metadata ->> 'actor_id') + 1)
                            = ':' || (e.metadata ->> 'actor_id')
      WHERE k2.state = 'in_flight'
        AND k2.response_body ? 'status'
      GROUP BY k2.caller, k2.key) appended
WHERE k.caller = appended.caller
  AND k.key = appended.key;
