-- outbox 0008: two indexes so that a person's first look (`outbox web`'s overview) stays quick
-- on a table of millions of rows.
--
-- 1. events_undelivered_idx: every row that is not delivered (pending, failed, discarded,
--    skipped), by type, status and outcome, with the times the overview shows. What needs a
--    person is counted from it alone (an index-only scan of those rows), instead of a scan of
--    the whole table, where delivered rows are nearly all of it: on 1,000,000 delivered rows
--    `outbox status`'s summary took about 250 ms, most of the overview's time. Delivering a row
--    takes it out of the index; recording one puts it in (one more index entry per INSERT).
-- 2. attempts_started_at_idx: the overview's chart reads the last 24 hours of outbox.attempts;
--    without an index that was a scan of every attempt ever made (84 ms on 1,000,000).
--
-- On a large table, build both beforehand without blocking writes, then migrate (the IF NOT
-- EXISTS below then finds them):
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS events_undelivered_idx ON outbox.events
--       (event_type, status, outcome) INCLUDE (created_at, updated_at) WHERE status <> 'delivered';
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS attempts_started_at_idx ON outbox.attempts (started_at);

CREATE INDEX IF NOT EXISTS events_undelivered_idx ON outbox.events
    (event_type, status, outcome) INCLUDE (created_at, updated_at)
    WHERE status <> 'delivered';

CREATE INDEX IF NOT EXISTS attempts_started_at_idx ON outbox.attempts (started_at);
