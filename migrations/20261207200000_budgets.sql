-- Budgets (docs/budgets.md). What a workspace allows its agents to spend lives in the event
-- store (the `budget` aggregate); what was spent is the sum of its UsageRecorded events. The
-- tables below are kept by triggers on `events`, in the transaction that appends the event, so
-- the numbers are the audit trail's numbers whoever the writer is, and they can be rebuilt from
-- the events.

-- The current limits, one row per workspace and kind (BudgetSet / BudgetCleared).
CREATE TABLE budget_limits
(
    workspace_id text   NOT NULL,
    kind         text   NOT NULL,
    "limit"      bigint NOT NULL CHECK ("limit" > 0),
    PRIMARY KEY (workspace_id, kind)
);

-- The spending ledger: one row per workspace and scope and period.
--   scope 'workspace',            period 'YYYY-MM' (UTC month)
--   scope 'person:<user id>',     period 'YYYY-MM-DD' (UTC day; the prompt's author is charged)
--   scope 'session:<session id>', period '' (the session's life)
-- Rows are locked (in that order: workspace, person, session) by the prompt admission of
-- command-api and by the usage trigger, so two admissions in one workspace serialize.
CREATE TABLE budget_ledger
(
    workspace_id   text   NOT NULL,
    scope          text   NOT NULL,
    period         text   NOT NULL,
    cost_micro_usd bigint NOT NULL DEFAULT 0,
    tokens         bigint NOT NULL DEFAULT 0,
    -- time prompts of a session ran (PromptStarted to their end), only on session rows
    agent_ms       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, scope, period)
);

-- What each admitted, unfinished prompt holds back (command-api inserts it when it admits the
-- prompt, in the append's transaction); the usage recorded for the prompt draws it down and the
-- prompt's end (completed, failed, cancelled, or its session ending) deletes it.
CREATE TABLE budget_reservations
(
    session_id     uuid   NOT NULL,
    prompt_id      uuid   NOT NULL,
    workspace_id   text   NOT NULL,
    person_id      text   NOT NULL,
    month          text   NOT NULL,
    day            text   NOT NULL,
    cost_micro_usd bigint NOT NULL,
    tokens         bigint NOT NULL,
    used_cost      bigint NOT NULL DEFAULT 0,
    used_tokens    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, prompt_id)
);
CREATE INDEX budget_reservations_workspace ON budget_reservations (workspace_id, month);
CREATE INDEX budget_reservations_person ON budget_reservations (workspace_id, person_id, day);

CREATE FUNCTION canopy_budget_ledger() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    body      jsonb := NEW.payload -> NEW.event_type;
    ws        text;
    author    text;
    prompt    text;
    v_cost    bigint;
    v_tokens  bigint;
    started   timestamptz;
BEGIN
    IF NEW.aggregate_type = 'budget' THEN
        IF NEW.event_type = 'BudgetSet' THEN
            INSERT INTO budget_limits (workspace_id, kind, "limit")
            VALUES (body ->> 'workspace_id', body ->> 'kind', (body ->> 'limit')::bigint)
            ON CONFLICT (workspace_id, kind) DO UPDATE SET "limit" = EXCLUDED."limit";
        ELSIF NEW.event_type = 'BudgetCleared' THEN
            DELETE FROM budget_limits
             WHERE workspace_id = body ->> 'workspace_id' AND kind = body ->> 'kind';
        END IF;
        RETURN NULL;
    END IF;
    IF NEW.aggregate_type <> 'session' THEN
        RETURN NULL;
    END IF;
    IF NEW.event_type IN ('SessionCompleted', 'SessionFailed', 'SessionArchived') THEN
        DELETE FROM budget_reservations WHERE session_id = NEW.aggregate_id::uuid;
        RETURN NULL;
    END IF;

    SELECT payload #>> '{SessionStarted,workspace_id}' INTO ws
      FROM events
     WHERE aggregate_type = 'session' AND aggregate_id = NEW.aggregate_id AND sequence = 1;
    prompt := body ->> 'prompt_id';

    IF NEW.event_type = 'UsageRecorded' THEN
        SELECT payload #>> '{PromptSubmitted,author_id}' INTO author
          FROM events
         WHERE aggregate_type = 'session' AND aggregate_id = NEW.aggregate_id
           AND event_type = 'PromptSubmitted' AND payload #>> '{PromptSubmitted,prompt_id}' = prompt;
        v_cost := COALESCE((body ->> 'cost_micro_usd')::bigint, 0);
        -- version 1 named the token counts tokens_in and tokens_out
        v_tokens := COALESCE((body ->> 'input_tokens')::bigint, (body ->> 'tokens_in')::bigint, 0)
                + COALESCE((body ->> 'output_tokens')::bigint, (body ->> 'tokens_out')::bigint, 0);
        INSERT INTO budget_ledger AS l (workspace_id, scope, period, cost_micro_usd, tokens)
        VALUES (ws, 'workspace', to_char(NEW.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM'), v_cost, v_tokens),
               (ws, 'person:' || COALESCE(author, ''),
                to_char(NEW.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), v_cost, v_tokens),
               (ws, 'session:' || NEW.aggregate_id, '', v_cost, v_tokens)
        ON CONFLICT (workspace_id, scope, period) DO UPDATE
            SET cost_micro_usd = l.cost_micro_usd + EXCLUDED.cost_micro_usd,
                tokens = l.tokens + EXCLUDED.tokens;
        UPDATE budget_reservations
           SET used_cost = used_cost + v_cost, used_tokens = used_tokens + v_tokens
         WHERE session_id = NEW.aggregate_id::uuid AND prompt_id = prompt::uuid;
    ELSIF NEW.event_type IN ('PromptCompleted', 'PromptFailed', 'PromptCancelled') THEN
        SELECT recorded_at INTO started
          FROM events
         WHERE aggregate_type = 'session' AND aggregate_id = NEW.aggregate_id
           AND event_type = 'PromptStarted' AND payload #>> '{PromptStarted,prompt_id}' = prompt
         ORDER BY sequence DESC LIMIT 1;
        IF started IS NOT NULL THEN
            INSERT INTO budget_ledger AS l (workspace_id, scope, period, agent_ms)
            VALUES (ws, 'session:' || NEW.aggregate_id, '',
                    GREATEST((extract(epoch FROM NEW.recorded_at - started) * 1000)::bigint, 0))
            ON CONFLICT (workspace_id, scope, period) DO UPDATE
                SET agent_ms = l.agent_ms + EXCLUDED.agent_ms;
        END IF;
        DELETE FROM budget_reservations
         WHERE session_id = NEW.aggregate_id::uuid AND prompt_id = prompt::uuid;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_budget_ledger
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.event_type IN ('UsageRecorded', 'PromptCompleted', 'PromptFailed', 'PromptCancelled',
                             'SessionCompleted', 'SessionFailed', 'SessionArchived',
                             'BudgetSet', 'BudgetCleared'))
EXECUTE FUNCTION canopy_budget_ledger();

-- A budget warning is recorded once per budget, scope, period and limit, whichever session's
-- usage reached it and however many command-api processes noticed (409 `duplicate_id` is
-- swallowed by command-api: someone recorded it first).
CREATE UNIQUE INDEX events_budget_threshold_once
    ON events ((payload #>> '{BudgetThresholdReached,workspace_id}'),
               (payload #>> '{BudgetThresholdReached,budget}'),
               (payload #>> '{BudgetThresholdReached,scope}'),
               (payload #>> '{BudgetThresholdReached,period}'),
               (payload #>> '{BudgetThresholdReached,limit}'))
    WHERE aggregate_type = 'session' AND event_type = 'BudgetThresholdReached';

-- The concurrency cap: the runner notes the session's workspace on its lease and counts them.
ALTER TABLE runner_leases ADD COLUMN workspace_id text;
CREATE INDEX runner_leases_workspace ON runner_leases (workspace_id) WHERE workspace_id IS NOT NULL;

-- query-api shows every member the budgets with spent and remaining
GRANT SELECT ON budget_limits, budget_ledger, budget_reservations TO canopy_reader;
-- and the cap's current use
GRANT SELECT ON runner_leases TO canopy_reader;
