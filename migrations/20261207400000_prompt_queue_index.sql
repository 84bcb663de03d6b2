-- The sessions projection renumbers a session's queue and counts it on every prompt event. Over
-- the session's whole prompt history that is quadratic in a long session (a 10,000-prompt
-- session's rebuild ran at a few hundred events per second). This partial index holds only the
-- prompts that are queued or still carry a queue position, so both statements read the queue,
-- not the history. Rebuilds copy it (their shadow tables are LIKE ... INCLUDING ALL).
CREATE INDEX prompts_queue ON read.prompts (session_id, submitted_sequence)
    WHERE status = 'queued' OR queue_position IS NOT NULL;
