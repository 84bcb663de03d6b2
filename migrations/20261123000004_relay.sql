-- The relay's checkpoint: per relay name, the (transaction id, position) of the last event whose
-- PubAck it received with every earlier event (in that order) acknowledged too. (0, 0) means
-- nothing is published yet. Only the relay holding the advisory lock writes its row.
CREATE TABLE relay_checkpoints
(
    name           text PRIMARY KEY,
    transaction_id xid8        NOT NULL DEFAULT '0',
    position       bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
