-- outbox 0002: the operator surface (`outbox status | failed | show | retry | discard | prune`).
--
-- - events.order_released: a person let a refund go although its sale was discarded;
-- - outbox.operator_actions / outbox.operator_action_events: who did what, when and why;
-- - partial indexes for `outbox prune` (delivered and discarded rows by age);
-- - the views outbox.failed_deliveries, outbox.blocked_deliveries, outbox.delivery_summary,
--   which `outbox status` and `outbox failed` read too, so the CLI and any SQL tool agree.
--
-- On a table with many millions of rows the two CREATE INDEX statements hold a lock that
-- blocks INSERTs while they build. To avoid that, create them beforehand with
-- CREATE INDEX CONCURRENTLY IF NOT EXISTS (same names and definitions); this file then skips
-- them. See docs/operations.md.

-- A refund waits for a delivered sale of its key (SPEC rule 2); behind a sale a person
-- discarded it would wait forever. `outbox discard --refunds release` sets this flag, and the
-- claim query then sends the refund without a delivered sale (Partnero most likely answers
-- 404: not_found). Adding a column with a constant default does not rewrite the table.
ALTER TABLE outbox.events ADD COLUMN order_released boolean NOT NULL DEFAULT false;

-- order_released belongs to the daemon and the operators like the other bookkeeping columns:
-- an INSERT may not set it. The trigger is recreated with that column in its WHEN clause.
DROP TRIGGER events_refuse_daemon_owned_columns ON outbox.events;
CREATE TRIGGER events_refuse_daemon_owned_columns
    BEFORE INSERT ON outbox.events
    FOR EACH ROW
    WHEN (NEW.status IS DISTINCT FROM 'pending'
          OR NEW.outcome IS NOT NULL
          OR NEW.attempts IS DISTINCT FROM 0
          OR NEW.lookup_required IS DISTINCT FROM false
          OR NEW.parked IS DISTINCT FROM false
          OR NEW.order_released IS DISTINCT FROM false
          OR NEW.lease_owner IS NOT NULL
          OR NEW.lease_token IS NOT NULL
          OR NEW.lease_expires_at IS NOT NULL
          OR NEW.last_error IS NOT NULL
          OR NEW.last_status_code IS NOT NULL
          OR NEW.delivered_at IS NOT NULL
          OR NEW.next_attempt_at IS DISTINCT FROM now()
          OR NEW.created_at IS DISTINCT FROM now()
          OR NEW.updated_at IS DISTINCT FROM now())
    EXECUTE FUNCTION outbox.refuse_daemon_owned_columns();

-- `outbox prune`: delivered rows by delivered_at, discarded rows by when they were discarded.
CREATE INDEX IF NOT EXISTS events_delivered_at_idx
    ON outbox.events (delivered_at) WHERE status = 'delivered';
CREATE INDEX IF NOT EXISTS events_discarded_idx
    ON outbox.events (updated_at) WHERE status = 'discarded';

-- One row per `outbox retry | discard | prune` that changed something (dry runs are not
-- recorded). Never pruned.
CREATE TABLE outbox.operator_actions (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    action      text        NOT NULL,
    reason      text        NOT NULL,
    selection   jsonb       NOT NULL DEFAULT '{}',
    event_count integer     NOT NULL,
    CONSTRAINT operator_action_known CHECK (action IN ('retry', 'discard', 'prune')),
    CONSTRAINT operator_action_actor_required CHECK (length(btrim(actor)) > 0),
    CONSTRAINT operator_action_reason_required CHECK (length(btrim(reason)) > 0)
);

COMMENT ON TABLE outbox.operator_actions IS
    'Every outbox retry, discard and prune a person ran: who (actor), when (at), why (reason), '
    'what they selected (selection: ids or filters and options) and how many rows it changed.';

-- The rows a retry or discard changed, with their state before it. No foreign key to
-- outbox.events: the record outlives an event that is later delivered and pruned.
CREATE TABLE outbox.operator_action_events (
    action_id         bigint  NOT NULL REFERENCES outbox.operator_actions (id) ON DELETE CASCADE,
    event_id          bigint  NOT NULL,
    event_type        text    NOT NULL,
    transaction_key   text    NOT NULL,
    change            text    NOT NULL,
    previous_status   text    NOT NULL,
    previous_outcome  text,
    previous_attempts integer NOT NULL,
    PRIMARY KEY (action_id, event_id),
    CONSTRAINT operator_action_change_known CHECK (change IN ('retry', 'discard', 'release'))
);

CREATE INDEX operator_action_events_event_id_idx ON outbox.operator_action_events (event_id);

COMMENT ON TABLE outbox.operator_action_events IS
    'The events an operator action changed (retry, discard, or release of a refund queued '
    'behind a discarded sale), each with its status, outcome and attempts before the change.';

-- Failed rows: they need a person (`outbox failed`, `outbox retry`, `outbox discard`).
-- rows_waiting counts the pending rows of the same key that wait for this one (SPEC rule 2).
CREATE VIEW outbox.failed_deliveries AS
SELECT e.id,
       e.event_type,
       e.transaction_key,
       e.customer_key,
       e.amount,
       e.currency,
       e.outcome,
       e.last_status_code,
       e.last_error,
       e.attempts,
       e.lookup_required,
       e.created_at,
       e.updated_at AS failed_at,
       (SELECT count(*)
        FROM outbox.events w
        WHERE w.transaction_key = e.transaction_key
          AND w.status = 'pending'
          AND w.id <> e.id
          AND CASE WHEN w.event_type = 'sale'
                   THEN e.event_type = 'sale' AND e.id < w.id
                   ELSE e.event_type = 'sale' OR e.id < w.id END) AS rows_waiting
FROM outbox.events e
WHERE e.status = 'failed';

COMMENT ON VIEW outbox.failed_deliveries IS
    'Failed events (they need a person) with the reason, last HTTP status, attempts, and how '
    'many pending rows of the same transaction key wait for them.';

-- Pending rows that cannot be sent until a person acts: a failed row ahead of them in their
-- key's order (every sale before every refund, then by id: the claim query's rule), or, for a
-- refund, a key whose sales were all discarded (unless a person released it). blocked_by_* is
-- the row it waits for: the earliest failed one, else the discarded sale.
CREATE VIEW outbox.blocked_deliveries AS
SELECT e.id,
       e.event_type,
       e.transaction_key,
       e.customer_key,
       e.amount,
       e.currency,
       e.attempts,
       e.last_status_code,
       e.last_error,
       e.created_at,
       e.updated_at,
       b.id AS blocked_by_id,
       b.event_type AS blocked_by_type,
       b.status AS blocked_by_status,
       b.outcome AS blocked_by_outcome
FROM outbox.events e
CROSS JOIN LATERAL (
    SELECT p.id, p.event_type, p.status, p.outcome
    FROM outbox.events p
    WHERE p.transaction_key = e.transaction_key
      AND p.id <> e.id
      AND ((p.status = 'failed'
            AND CASE WHEN e.event_type = 'sale'
                     THEN p.event_type = 'sale' AND p.id < e.id
                     ELSE p.event_type = 'sale' OR p.id < e.id END)
           OR (e.event_type = 'refund'
               AND NOT e.order_released
               AND p.event_type = 'sale'
               AND p.status = 'discarded'
               AND NOT EXISTS (
                   SELECT 1 FROM outbox.events s
                   WHERE s.transaction_key = e.transaction_key
                     AND s.event_type = 'sale'
                     AND s.status <> 'discarded')))
    ORDER BY p.status = 'failed' DESC, p.id
    LIMIT 1
) b
WHERE e.status = 'pending';

COMMENT ON VIEW outbox.blocked_deliveries IS
    'Pending events that wait for a failed or discarded event of the same transaction key '
    '(blocked_by_*) and will not be sent until a person retries or discards it.';

-- Counts by type, status and outcome, with the oldest and newest row of each group and the
-- last delivery. The oldest pending row: min(oldest_created_at) WHERE status = 'pending'.
CREATE VIEW outbox.delivery_summary AS
SELECT event_type,
       status,
       outcome,
       count(*) AS events,
       min(created_at) AS oldest_created_at,
       max(created_at) AS newest_created_at,
       now() - min(created_at) AS oldest_age,
       max(delivered_at) AS last_delivered_at,
       max(updated_at) AS last_updated_at
FROM outbox.events
GROUP BY event_type, status, outcome;

COMMENT ON VIEW outbox.delivery_summary IS
    'Events counted by event_type, status and outcome, with the oldest row of each group and '
    'the last delivery.';
