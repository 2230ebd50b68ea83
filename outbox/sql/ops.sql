-- The operator commands' queries (outbox/ops/commands.py), loaded by name with
-- outbox.queries.get(name, "ops.sql"). Unlike queries.sql (psycopg, the daemon) these run through
-- SQLAlchemy's text(): parameters are :name. An optional filter is NULL when not given.
-- `outbox status` and `outbox failed` read the views of migration 0002, so the CLI and plain SQL
-- give the same answers.

-- name: now
-- The database's clock (in a transaction: when it began); --since and --until count from it.
SELECT now()

-- name: action_settings
-- A short writing transaction (retry, discard, a prune batch): never wait longer than
-- :lock_timeout for a row another transaction holds, and no JIT (these statements touch a few
-- rows; a stale estimate could make compiling them cost more than running them). Both as
-- SET LOCAL: they end with the transaction.
SELECT set_config('lock_timeout', CAST(:lock_timeout AS text), true),
       set_config('jit', 'off', true)

-- name: problems
-- Failed rows and rows blocked behind a failed or discarded row: what `outbox failed` lists and
-- what `outbox retry` / `outbox discard` select by filter; and skipped rows, only when :states
-- names them (`outbox retry --status skipped`: settled rows, no problem of anyone's). :states
-- says which of 'failed', 'blocked', 'skipped' to read; a branch not named is never run.
-- Filters apply to the row itself; a blocked row has no outcome of its own (its blocked_by_*
-- columns say what it waits for). Times filter and sort on created_at, when the shop recorded
-- the event. An optional filter is NULL when not given; :limit NULL means every row, :offset
-- skips that many.
-- One page, newest first, each row with `total`, the rows matching over all pages. A page past
-- the end is one row whose columns are all NULL but `total`, so the count is always there.
WITH problems AS (
    SELECT p.*, extract(epoch FROM now() - p.created_at)::float8 AS age_seconds
    FROM (
        SELECT 'failed' AS state, f.id, f.event_type, f.transaction_key, f.customer_key, f.amount,
               f.currency, f.outcome, f.last_status_code, f.last_error, f.attempts, f.created_at,
               f.failed_at AS updated_at, f.rows_waiting,
               NULL::bigint AS blocked_by_id, NULL::text AS blocked_by_type,
               NULL::text AS blocked_by_status, NULL::text AS blocked_by_outcome
        FROM outbox.failed_deliveries f
        WHERE 'failed' = ANY(CAST(:states AS text[]))
        UNION ALL
        SELECT 'blocked', b.id, b.event_type, b.transaction_key, b.customer_key, b.amount,
               b.currency, NULL, b.last_status_code, b.last_error, b.attempts, b.created_at,
               b.updated_at, 0, b.blocked_by_id, b.blocked_by_type, b.blocked_by_status,
               b.blocked_by_outcome
        FROM outbox.blocked_deliveries b
        WHERE 'blocked' = ANY(CAST(:states AS text[]))
        UNION ALL
        SELECT 'skipped', s.id, s.event_type, s.transaction_key, s.customer_key, s.amount,
               s.currency, s.outcome, s.last_status_code, s.last_error, s.attempts, s.created_at,
               s.updated_at, 0, NULL, NULL, NULL, NULL
        FROM outbox.events s
        WHERE s.status = 'skipped' AND 'skipped' = ANY(CAST(:states AS text[]))
    ) p
    WHERE (CAST(:ids AS bigint[]) IS NULL OR p.id = ANY(CAST(:ids AS bigint[])))
      AND (CAST(:outcome AS text) IS NULL OR p.outcome = CAST(:outcome AS text))
      AND (CAST(:status_code AS integer) IS NULL
           OR p.last_status_code = CAST(:status_code AS integer))
      AND (CAST(:since AS timestamptz) IS NULL OR p.created_at >= CAST(:since AS timestamptz))
      AND (CAST(:until AS timestamptz) IS NULL OR p.created_at < CAST(:until AS timestamptz))
      AND (CAST(:key AS text) IS NULL OR p.transaction_key = CAST(:key AS text))
      AND (CAST(:customer AS text) IS NULL OR p.customer_key = CAST(:customer AS text))
      AND (CAST(:event_type AS text) IS NULL OR p.event_type = CAST(:event_type AS text))
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM problems) t
LEFT JOIN LATERAL (
    SELECT * FROM problems
    ORDER BY created_at DESC, id DESC
    LIMIT CAST(:limit AS bigint) OFFSET CAST(:offset AS bigint)
) page ON true

-- name: summary
-- `outbox status`: the backlog by type, status and outcome (the delivery_summary view), in
-- delivery order of the types, and what needs a person before what is settled.
SELECT event_type, status, outcome, events, oldest_created_at, last_delivered_at,
       extract(epoch FROM oldest_age)::float8 AS oldest_age_seconds
FROM outbox.delivery_summary
ORDER BY array_position(ARRAY['signup', 'sale', 'refund'], event_type),
         array_position(ARRAY['pending', 'failed', 'discarded', 'delivered', 'skipped'], status),
         outcome NULLS FIRST

-- name: undelivered_summary
-- The overview (`outbox web`): the summary's groups that are not delivered, read from the two
-- partial indexes that hold those rows (events_pending_due_idx; events_not_delivered_idx, 0008)
-- instead of the whole table. Same columns as `summary`.
SELECT event_type, status, outcome, count(*) AS events,
       min(created_at) AS oldest_created_at, NULL::timestamptz AS last_delivered_at,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds
FROM (SELECT event_type, status, outcome, created_at
      FROM outbox.events WHERE status = 'pending'
      UNION ALL
      SELECT event_type, status, outcome, created_at
      FROM outbox.events WHERE status IN ('failed', 'discarded', 'skipped')) AS e
GROUP BY event_type, status, outcome
ORDER BY array_position(ARRAY['signup', 'sale', 'refund'], event_type),
         array_position(ARRAY['pending', 'failed', 'discarded', 'delivered', 'skipped'], status),
         outcome NULLS FIRST

-- name: last_delivered
-- The overview: when the last row was delivered (events_settled_idx, newest first).
SELECT coalesce(delivered_at, updated_at) AS last_delivered_at
FROM outbox.events
WHERE status IN ('delivered', 'skipped', 'discarded') AND status = 'delivered'
ORDER BY coalesce(delivered_at, updated_at) DESC
LIMIT 1

-- name: pending_overview
-- `outbox status`: pending rows, those in flight (a live lease), those blocked behind a failed
-- or discarded row, the oldest pending row, and the oldest one that is not blocked (the
-- daemon's lag). Ages are the database's now() minus created_at.
WITH blocked AS (SELECT id FROM outbox.blocked_deliveries)
SELECT count(*) AS events,
       count(*) FILTER (WHERE e.lease_expires_at > now()) AS in_flight,
       (SELECT count(*) FROM blocked) AS blocked,
       min(e.created_at) AS oldest_created_at,
       extract(epoch FROM now() - min(e.created_at))::float8 AS oldest_age_seconds,
       min(e.created_at) FILTER (WHERE e.id NOT IN (SELECT id FROM blocked))
           AS oldest_waiting_created_at,
       extract(epoch FROM now() - min(e.created_at)
                                  FILTER (WHERE e.id NOT IN (SELECT id FROM blocked)))::float8
           AS oldest_waiting_age_seconds,
       now() AS checked_at
FROM outbox.events e
WHERE e.status = 'pending'

-- name: leases
-- `outbox status`: the daemons holding leases now (an idle daemon holds none). An expired lease
-- is a daemon that died or stalled; its rows are rescued by any running daemon.
SELECT lease_owner AS owner,
       count(*) AS events,
       count(*) FILTER (WHERE lease_expires_at <= now()) AS expired,
       max(lease_expires_at) AS expires_at,
       extract(epoch FROM max(lease_expires_at) - now())::float8 AS expires_in_seconds
FROM outbox.events
WHERE status = 'pending' AND lease_token IS NOT NULL
GROUP BY lease_owner
ORDER BY lease_owner

-- name: last_attempt
-- `outbox status`: the last HTTP call any daemon made (a 401 here explains a paused daemon).
SELECT a.event_id, a.started_at, a.method, a.path, a.status_code, a.decision, a.error,
       a.daemon, extract(epoch FROM now() - a.started_at)::float8 AS age_seconds
FROM outbox.attempts a
ORDER BY a.id DESC
LIMIT 1

-- name: events
-- `outbox show`: rows by id, by transaction key, or by customer (its signups and sales, and the
-- refunds of those sales' keys), in delivery order: signups first, then key by key (in the order
-- of each key's first row) every sale before every refund, then by id; with what a blocked row
-- waits for. Customer keys have no index but for signups: by customer, the table is read whole.
SELECT e.id, e.event_type, e.transaction_key, e.customer_key, e.amount, e.currency, e.payload,
       e.status, e.outcome, e.attempts, e.next_attempt_at, e.lookup_required, e.parked,
       e.order_released, e.lease_owner, e.lease_expires_at, e.last_error, e.last_status_code,
       e.created_at, e.updated_at, e.delivered_at,
       extract(epoch FROM now() - e.created_at)::float8 AS age_seconds,
       b.blocked_by_id, b.blocked_by_type, b.blocked_by_status, b.blocked_by_outcome
FROM outbox.events e
LEFT JOIN outbox.blocked_deliveries b ON b.id = e.id
WHERE (CAST(:id AS bigint) IS NULL OR e.id = CAST(:id AS bigint))
  AND (CAST(:key AS text) IS NULL OR e.transaction_key = CAST(:key AS text))
  AND (CAST(:customer AS text) IS NULL
       OR e.customer_key = CAST(:customer AS text)
       OR e.transaction_key IN (SELECT s.transaction_key FROM outbox.events s
                                WHERE s.customer_key = CAST(:customer AS text)
                                  AND s.event_type = 'sale'))
ORDER BY e.event_type <> 'signup', min(e.id) OVER (PARTITION BY e.transaction_key),
         e.event_type = 'refund', e.id

-- name: attempts
-- `outbox show`: every HTTP call made for the rows, oldest first.
SELECT a.event_id, a.attempt, a.started_at, a.finished_at,
       extract(epoch FROM a.finished_at - a.started_at)::float8 * 1000 AS duration_ms,
       a.method, a.path, a.status_code, a.response_excerpt, a.error, a.decision, a.daemon
FROM outbox.attempts a
WHERE a.event_id = ANY(CAST(:ids AS bigint[]))
ORDER BY a.event_id, a.id

-- name: actions
-- `outbox show`: the operator actions that changed the rows, oldest first.
SELECT ae.event_id, a.id AS action_id, a.at, a.actor, a.action, ae.change, a.reason,
       ae.previous_status, ae.previous_outcome, ae.previous_attempts
FROM outbox.operator_action_events ae
JOIN outbox.operator_actions a ON a.id = ae.action_id
WHERE ae.event_id = ANY(CAST(:ids AS bigint[]))
ORDER BY ae.event_id, a.id

-- name: lock_events
-- retry / discard: the selected rows, locked for the rest of the transaction (a daemon's claim
-- skips them; its result writes wait). `leased` means a daemon holds the row right now.
SELECT e.id, e.event_type, e.transaction_key, e.customer_key, e.status, e.outcome, e.attempts,
       e.parked, e.lease_owner, coalesce(e.lease_expires_at > now(), false) AS leased
FROM outbox.events e
WHERE e.id = ANY(CAST(:ids AS bigint[]))
ORDER BY e.id
FOR UPDATE

-- name: blockers
-- retry: what the selected pending rows wait for, to name it in the refusal.
SELECT id, blocked_by_id, blocked_by_type, blocked_by_status
FROM outbox.blocked_deliveries
WHERE id = ANY(CAST(:ids AS bigint[]))

-- name: related_rows
-- retry / discard: the other rows of the keys of the rows acted on, and the parked sales of the
-- customers of the signups acted on (a sale waits behind its customer's signup), other than
-- :ids, locked for the rest of the transaction; the columns of lock_events. The action picks
-- from them: the parked rows to wake (due now, so that a running daemon looks at them at once);
-- for a retry, the refunds skipped behind a skipped sale (back to pending with it), refunds
-- already delivered behind a discarded or skipped sale (sending the sale now would create a
-- transaction whose reversal has been sent), and the skipped sale a refund waits for.
SELECT e.id, e.event_type, e.transaction_key, e.customer_key, e.status, e.outcome, e.attempts,
       e.parked, e.lease_owner, coalesce(e.lease_expires_at > now(), false) AS leased
FROM outbox.events e
WHERE (e.transaction_key = ANY(CAST(:keys AS text[]))
       OR (e.parked AND e.event_type = 'sale' AND e.status = 'pending'
           AND e.customer_key = ANY(CAST(:customers AS text[]))))
  AND e.id <> ALL(CAST(:ids AS bigint[]))
ORDER BY e.id
FOR UPDATE

-- name: refunds_left_behind
-- discard: pending refunds that discarding :ids would leave behind sales that are all
-- discarded (the claim query keeps those waiting unless a person releases them).
SELECT r.id, r.event_type, r.transaction_key, r.customer_key, r.status, r.outcome, r.attempts,
       r.parked, r.lease_owner, coalesce(r.lease_expires_at > now(), false) AS leased
FROM outbox.events r
WHERE r.event_type = 'refund' AND r.status = 'pending' AND NOT r.order_released
  AND r.id <> ALL(CAST(:ids AS bigint[]))
  AND r.transaction_key IN (
      SELECT t.transaction_key FROM outbox.events t
      WHERE t.id = ANY(CAST(:ids AS bigint[])) AND t.event_type = 'sale')
  AND NOT EXISTS (
      SELECT 1 FROM outbox.events s
      WHERE s.transaction_key = r.transaction_key AND s.event_type = 'sale'
        AND s.status <> 'discarded' AND s.id <> ALL(CAST(:ids AS bigint[])))
ORDER BY r.id
FOR UPDATE OF r

-- name: apply_retry
-- Back to pending, due now, with a fresh attempt budget: the failed, discarded and skipped rows of
-- `outbox retry` alike, and the delivered rows of `outbox reconcile --requeue-missing` (the
-- callers choose the rows; `outbox retry` refuses a delivered one). lookup_required is kept: an
-- earlier create may have reached Partnero, and the lookup is what prevents a second commission.
-- A delivered row gets it set: its sale is looked up before it is created again (a concurrent fix
-- is not doubled), its refund's DELETE is sent again (a 404 then reads as reversed).
UPDATE outbox.events
SET status = 'pending',
    outcome = NULL,
    attempts = 0,
    next_attempt_at = now(),
    lookup_required = lookup_required OR status = 'delivered',
    parked = false,
    delivered_at = NULL,
    updated_at = now()
WHERE id = ANY(CAST(:ids AS bigint[]))
  AND status IN ('failed', 'discarded', 'skipped', 'delivered')

-- name: apply_discard
-- A person gives up on the rows. A pending row whose lease had expired (its daemon died) may
-- have reached Partnero: it is flagged for a lookup should anyone retry it.
UPDATE outbox.events
SET status = 'discarded',
    parked = false,
    lookup_required = lookup_required OR lease_token IS NOT NULL,
    lease_owner = NULL,
    lease_token = NULL,
    lease_expires_at = NULL,
    updated_at = now()
WHERE id = ANY(CAST(:ids AS bigint[])) AND status IN ('pending', 'failed')

-- name: apply_release
-- Let refunds go although their sale was discarded; due now.
UPDATE outbox.events
SET order_released = true,
    parked = false,
    next_attempt_at = now(),
    updated_at = now()
WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'pending'

-- name: apply_wake
UPDATE outbox.events
SET parked = false, next_attempt_at = now()
WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'pending'

-- name: record_action
INSERT INTO outbox.operator_actions (actor, action, reason, selection, event_count)
VALUES (:actor, :action, :reason, CAST(:selection AS jsonb), :event_count)
RETURNING id, at

-- name: record_action_events
INSERT INTO outbox.operator_action_events (action_id, event_id, event_type, transaction_key,
                                           change, previous_status, previous_outcome,
                                           previous_attempts)
SELECT :action_id, r.*
FROM unnest(CAST(:event_ids AS bigint[]), CAST(:event_types AS text[]),
            CAST(:keys AS text[]), CAST(:changes AS text[]), CAST(:statuses AS text[]),
            CAST(:outcomes AS text[]), CAST(:attempts AS integer[])) AS r

-- name: notify
SELECT pg_notify('outbox_events', '')

-- name: prune_cutoff
SELECT now() - make_interval(secs => :seconds) AS cutoff

-- name: prune_preview
-- `outbox prune --dry-run`, and what a real run kept: settled rows of :statuses (delivered,
-- skipped, discarded) settled before the cutoff, and those of them kept because their key still
-- has a pending or failed row (a refund may still wait on the sale, or the sale be retried). The
-- literal IN list lets the planner use events_settled_idx whatever :statuses is.
WITH old AS (
    SELECT e.id, e.status,
           EXISTS (SELECT 1 FROM outbox.events o
                   WHERE o.transaction_key = e.transaction_key
                     AND o.status IN ('pending', 'failed')) AS key_open
    FROM outbox.events e
    WHERE e.status IN ('delivered', 'skipped', 'discarded')
      AND e.status = ANY(CAST(:statuses AS text[]))
      AND coalesce(e.delivered_at, e.updated_at) < :cutoff
)
SELECT count(*) FILTER (WHERE status = 'delivered' AND NOT key_open) AS delivered,
       count(*) FILTER (WHERE status = 'discarded' AND NOT key_open) AS discarded,
       (SELECT count(*) FROM outbox.attempts a JOIN old o ON o.id = a.event_id
        WHERE NOT o.key_open) AS attempts,
       count(*) FILTER (WHERE status = 'skipped' AND NOT key_open) AS skipped,
       count(*) FILTER (WHERE key_open) AS kept_open_key
FROM old

-- name: prune_batch
-- One batch of settled rows of :statuses settled before the cutoff (a delivered row by
-- delivered_at, a skipped or discarded one by updated_at, when it was skipped or discarded),
-- oldest first, through events_settled_idx; with their attempts (ON DELETE CASCADE), in one
-- short transaction; rows another transaction holds are left for the next run. The literal IN
-- list is the index's own predicate: with it the planner may use the index even in a generic
-- plan, where `= ANY(:statuses)` alone proves nothing.
WITH doomed AS (
    SELECT e.id
    FROM outbox.events e
    WHERE e.status IN ('delivered', 'skipped', 'discarded')
      AND e.status = ANY(CAST(:statuses AS text[]))
      AND coalesce(e.delivered_at, e.updated_at) < :cutoff
      AND NOT EXISTS (SELECT 1 FROM outbox.events o
                      WHERE o.transaction_key = e.transaction_key
                        AND o.status IN ('pending', 'failed'))
    ORDER BY coalesce(e.delivered_at, e.updated_at)
    LIMIT :batch_size
    FOR UPDATE SKIP LOCKED
),
counted AS (
    -- Per row through attempts_event_id_idx: a join here may scan every attempt per batch.
    SELECT coalesce(sum(c.n), 0) AS attempts
    FROM doomed d
    CROSS JOIN LATERAL (SELECT count(*) AS n FROM outbox.attempts a WHERE a.event_id = d.id) c
),
gone AS (
    DELETE FROM outbox.events e USING doomed d WHERE e.id = d.id RETURNING e.status
)
SELECT count(*) AS events,
       count(*) FILTER (WHERE status = 'delivered') AS delivered,
       count(*) FILTER (WHERE status = 'discarded') AS discarded,
       (SELECT attempts FROM counted) AS attempts,
       count(*) FILTER (WHERE status = 'skipped') AS skipped
FROM gone
