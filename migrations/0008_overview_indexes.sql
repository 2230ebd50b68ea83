-- outbox 0008: two indexes so that a person's first look (`outbox web`'s overview) stays quick
-- on a table of millions of rows.
--
-- 1. events_not_delivered_idx: the failed, discarded and skipped rows, by type, status and
--    outcome, with their times. With the pending rows (events_pending_due_idx) they are what the
--    overview counts (ops.attention), read from the two partial indexes instead of a scan of the
--    whole table, where delivered rows are nearly all of it: on 1,000,000 delivered rows
--    `outbox status`'s summary took about 250 ms, most of the overview's time. Pending rows
--    are left out: every INSERT and every claim writes a pending row, and the pending ones are
--    counted through events_pending_due_idx already, so a row enters this index only when it
--    fails or is skipped or discarded. (An index holding the pending rows too made no
--    measurable difference to the daemon in two throughput runs, docs/benchmarks.md: leaving
--    them out is a choice on principle, not a measured saving.)
-- 2. attempts_started_at_idx: the overview's chart reads the last 24 hours of outbox.attempts;
--    without an index that was a scan of every attempt ever made (84 ms on 1,000,000).
--
-- On a large table, build both beforehand without blocking writes, then migrate (the IF NOT
-- EXISTS below then finds them):
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS events_not_delivered_idx ON outbox.events
--       (event_type, status, outcome) INCLUDE (created_at)
--       WHERE status IN ('failed', 'discarded', 'skipped');
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS attempts_started_at_idx ON outbox.attempts (started_at);

CREATE INDEX IF NOT EXISTS events_not_delivered_idx ON outbox.events
    (event_type, status, outcome) INCLUDE (created_at)
    WHERE status IN ('failed', 'discarded', 'skipped');

CREATE INDEX IF NOT EXISTS attempts_started_at_idx ON outbox.attempts (started_at);
