-- The relay's wake-up leaves the appending transaction. A NOTIFY takes a database-wide lock
-- while its transaction commits, so with the events_notify trigger every append's commit waited
-- for every other append's: pgbench inserting single events gave 1.8k/s at 1 connection and no
-- more at 32. The event store now notifies after its commits, coalesced, from a transaction of
-- its own (crates/event-store/src/wake.rs); the relay LISTENs as before and polls as a safety
-- net for any other writer.
DROP TRIGGER events_notify ON events;
DROP FUNCTION canopy_events_notify();
