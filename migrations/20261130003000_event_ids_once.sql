-- Ids a session's commands create are unique within the session, for the session's whole life.
-- The session aggregate's state only remembers open and recently finished prompts (so that its
-- snapshot and load time do not grow with history); these indexes keep refusing an id the
-- aggregate has forgotten. command-api answers a violation as 409 `duplicate_id`, naming the
-- field after the index (events_<field>_once). Only the events that create an id enter an index.

CREATE UNIQUE INDEX events_prompt_id_once
    ON events (aggregate_id, (payload #>> '{PromptSubmitted,prompt_id}'))
    WHERE aggregate_type = 'session' AND event_type = 'PromptSubmitted';

CREATE UNIQUE INDEX events_plan_id_once
    ON events (aggregate_id, (payload #>> '{PlanProposed,plan_id}'))
    WHERE aggregate_type = 'session' AND event_type = 'PlanProposed';

CREATE UNIQUE INDEX events_request_id_once
    ON events (aggregate_id, (payload #>> '{ToolApprovalRequested,request_id}'))
    WHERE aggregate_type = 'session' AND event_type = 'ToolApprovalRequested';

CREATE UNIQUE INDEX events_checkpoint_id_once
    ON events (aggregate_id, (payload #>> '{CheckpointTaken,checkpoint_id}'))
    WHERE aggregate_type = 'session' AND event_type = 'CheckpointTaken';
