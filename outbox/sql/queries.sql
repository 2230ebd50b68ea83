-- The delivery engine's queries, loaded by name (outbox/db/queries.py). Parameters are psycopg's
-- %(name)s placeholders. Every statement runs on its own (autocommit): each is atomic, and no
-- transaction is ever held across an HTTP call.

-- name: claim
-- Take up to %(limit)s due rows under a lease. Rows that must wait for another row are parked
-- instead (docs/design.md, "Delivery rules" 2): they leave the head of the queue until
-- recheck_seconds pass or the row they wait for settles (see `complete`). Per key, every sale
-- comes before every refund, and rows of one type go in id order (outbox.goes_before, migration
-- 0005, which the planner inlines). Per customer, a sale waits while any signup of its
-- customer_key is pending or failed (0006). A refund needs a delivered sale; with no sale row
-- at all it waits orphan_grace_seconds for one to commit; when its sales were skipped it goes,
-- flagged sale_skipped, to be settled without a call. A refund a person released behind a
-- discarded sale (order_released: `outbox discard --refunds release`) needs none of this. A
-- leased row's next_attempt_at is its lease expiry, so an expired lease makes the row due
-- again: it is claimed with lookup_required set (an earlier call may have reached Partnero:
-- docs/design.md, "Delivery rules" 1; leases: "Delivery rules" 4).
WITH candidates AS (
    SELECT e.id, e.event_type, e.transaction_key, e.customer_key, e.created_at, e.order_released
    FROM outbox.events e
    WHERE e.status = 'pending' AND e.next_attempt_at <= now()
    ORDER BY e.next_attempt_at, e.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
judged AS (
    -- Everything the verdict needs about the other rows of the key, read in one scan of the key
    -- index. The status tests sit in the aggregates, not in a WHERE clause, so the planner can
    -- never pick a status-partial index here (events_settled_idx, say) and scan all of it
    -- once per candidate: that made a claim cost O(delivered rows).
    SELECT
        c.id,
        c.created_at,
        CASE
            WHEN k.blocking OR u.signup_open THEN 'blocked'
            WHEN c.event_type = 'refund' AND NOT c.order_released AND NOT k.delivered_sale
                THEN CASE
                    WHEN k.skipped_sale THEN 'ready'
                    WHEN k.any_sale THEN 'blocked'
                    WHEN c.created_at <= now() - make_interval(secs => %(orphan_grace_seconds)s)
                        THEN 'ready'
                    ELSE 'orphan'
                END
            ELSE 'ready'
        END AS verdict,
        c.event_type = 'sale' AND k.earlier_delivered_sale AS known_duplicate,
        k.blocker_in_flight OR u.signup_in_flight AS behind_in_flight,
        c.event_type = 'refund' AND NOT c.order_released AND NOT k.delivered_sale
            AND k.skipped_sale AS sale_skipped,
        u.signup_skipped AS customer_signup_skipped
    FROM candidates c
    CROSS JOIN LATERAL (
        SELECT
            coalesce(bool_or(p.before AND p.status IN ('pending', 'failed')), false) AS blocking,
            coalesce(bool_or(p.before AND p.status = 'pending' AND p.lease_token IS NOT NULL),
                     false) AS blocker_in_flight,
            coalesce(bool_or(p.event_type = 'sale' AND p.status = 'delivered'), false)
                AS delivered_sale,
            coalesce(bool_or(p.event_type = 'sale' AND p.status = 'skipped'), false)
                AS skipped_sale,
            coalesce(bool_or(p.event_type = 'sale'), false) AS any_sale,
            coalesce(bool_or(
                p.event_type = 'sale' AND p.status = 'delivered' AND p.id < c.id
            ), false) AS earlier_delivered_sale
        FROM (
            SELECT o.event_type, o.id, o.status, o.lease_token,
                   o.id <> c.id AND outbox.goes_before(o.event_type, o.id, c.event_type, c.id)
                       AS before
            FROM outbox.events o
            WHERE o.transaction_key = c.transaction_key
        ) p
    ) k
    CROSS JOIN LATERAL (
        -- The signups of a sale's customer (events_signup_customer_idx): "skipped" only when
        -- none of them created the customer.
        SELECT
            coalesce(bool_or(s.status IN ('pending', 'failed')), false) AS signup_open,
            coalesce(bool_or(s.status = 'pending' AND s.lease_token IS NOT NULL), false)
                AS signup_in_flight,
            coalesce(bool_or(s.status = 'skipped') AND NOT bool_or(s.status = 'delivered'), false)
                AS signup_skipped
        FROM outbox.events s
        WHERE c.event_type = 'sale' AND s.event_type = 'signup'
          AND s.customer_key = c.customer_key
    ) u
),
parked AS (
    UPDATE outbox.events e
    SET parked = true,
        next_attempt_at = CASE
            WHEN j.verdict = 'orphan' THEN least(
                j.created_at + make_interval(secs => %(orphan_grace_seconds)s),
                now() + make_interval(secs => %(recheck_seconds)s))
            -- Behind a row in flight, look again soon: its result may be written while this
            -- statement runs, and that statement's wake-up cannot see a park not yet committed.
            WHEN j.behind_in_flight THEN now() + make_interval(secs => least(
                %(recheck_seconds)s, %(in_flight_recheck_seconds)s))
            ELSE now() + make_interval(secs => %(recheck_seconds)s)
        END
    FROM judged j
    WHERE e.id = j.id AND j.verdict <> 'ready'
    RETURNING e.id
),
claimed AS (
    UPDATE outbox.events e
    SET parked = false,
        lease_owner = %(owner)s,
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
        next_attempt_at = now() + make_interval(secs => %(lease_seconds)s),
        lookup_required = e.lookup_required OR e.lease_token IS NOT NULL,
        updated_at = now()
    FROM judged j
    WHERE e.id = j.id AND j.verdict = 'ready'
    RETURNING e.id, e.event_type, e.transaction_key, e.customer_key, e.amount, e.currency,
              e.payload, e.attempts, e.lookup_required, e.lease_token, e.lease_expires_at,
              e.created_at, j.known_duplicate, j.sale_skipped, j.customer_signup_skipped
)
SELECT claimed.*, (SELECT count(*) FROM parked) AS parked_count
FROM claimed
ORDER BY claimed.id;


-- name: complete
-- Write a batch of results, each guarded by its lease token: a result whose lease was lost (the
-- row was rescued and claimed again elsewhere) changes nothing. The attempts are recorded either
-- way, since those HTTP calls did happen. Rows parked behind a row that settled here are woken.
-- applied_tokens: the leases whose results were applied (what the daemon may count as done).
-- The arrays go in binary (placeholders ending in b): psycopg then quotes no text elements (a
-- regex per element in the text format), most of the daemon's CPU for this statement.
WITH r AS (
    SELECT *
    FROM unnest(
        %(ids)b::bigint[], %(tokens)b::uuid[], %(statuses)b::text[], %(outcomes)b::text[],
        %(attempts)b::integer[], %(next_attempt_at)b::timestamptz[],
        %(lookup_required)b::boolean[], %(last_error)b::text[], %(last_status_code)b::integer[]
    ) AS r(id, token, status, outcome, attempts, next_attempt_at, lookup_required, last_error,
           last_status_code)
),
done AS (
    UPDATE outbox.events e
    SET status = r.status,
        outcome = r.outcome,
        attempts = r.attempts,
        next_attempt_at = r.next_attempt_at,
        lookup_required = r.lookup_required,
        last_error = coalesce(r.last_error, e.last_error),
        last_status_code = coalesce(r.last_status_code, e.last_status_code),
        lease_owner = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now(),
        delivered_at = CASE WHEN r.status = 'delivered' THEN now() END
    FROM r
    WHERE e.id = r.id AND e.lease_token = r.token AND e.status = 'pending'
    RETURNING e.id, r.token, e.event_type, e.transaction_key, e.customer_key, e.status
),
woken AS (
    UPDATE outbox.events w
    SET next_attempt_at = now(), parked = false
    WHERE w.parked AND w.status = 'pending'
      AND w.transaction_key IN (SELECT d.transaction_key FROM done d WHERE d.status <> 'pending')
    RETURNING w.id
),
woken_by_signup AS (
    -- The sales parked behind a signup of their customer that settled here
    -- (events_parked_customer_idx); a sale the step above wakes already is left to it.
    UPDATE outbox.events w
    SET next_attempt_at = now(), parked = false
    WHERE w.parked AND w.status = 'pending' AND w.event_type = 'sale'
      AND w.customer_key IN (SELECT d.customer_key FROM done d
                             WHERE d.event_type = 'signup' AND d.status <> 'pending')
      AND NOT EXISTS (SELECT 1 FROM done d
                      WHERE d.transaction_key = w.transaction_key AND d.status <> 'pending')
    RETURNING w.id
),
logged AS (
    INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, path,
                                 status_code, response_excerpt, error, decision, daemon)
    SELECT *
    FROM unnest(
        %(a_event_id)b::bigint[], %(a_attempt)b::integer[], %(a_started_at)b::timestamptz[],
        %(a_finished_at)b::timestamptz[], %(a_method)b::text[], %(a_path)b::text[],
        %(a_status_code)b::integer[], %(a_response_excerpt)b::text[], %(a_error)b::text[],
        %(a_decision)b::text[], %(a_daemon)b::text[]
    )
    RETURNING 1
)
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT coalesce(array_agg(d.token), '{}') FROM done d) AS applied_tokens,
       (SELECT count(*) FROM woken) + (SELECT count(*) FROM woken_by_signup) AS woken,
       (SELECT count(*) FROM logged) AS logged;

-- name: rescue
-- Leases that expired (a daemon died or stalled): clear them so the rows are plainly pending
-- again, flagged as "an earlier call may have been applied" (a sale is looked up before any new
-- create; a refund's later 404 reads as deleted). Returns who held them.
WITH expired AS (
    SELECT id, lease_owner
    FROM outbox.events
    WHERE status = 'pending' AND next_attempt_at <= now() AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.events e
SET lease_owner = NULL,
    lease_token = NULL,
    lease_expires_at = NULL,
    next_attempt_at = now(),
    lookup_required = true,
    updated_at = now()
FROM expired
WHERE e.id = expired.id
RETURNING e.id, e.transaction_key, expired.lease_owner;

-- name: database_now
-- The database's clock, for the daemon's offset from it (outbox/delivery/clock.py).
SELECT clock_timestamp() AS now;

-- name: next_due
-- When the earliest pending row is due (served by the partial index on pending rows).
SELECT min(next_attempt_at) AS next_due FROM outbox.events WHERE status = 'pending';

-- name: notify
SELECT pg_notify('outbox_events', '');

-- name: arm_doorbell
-- This daemon has caught up and will sleep: from now on INSERTs NOTIFY (migration 0003).
-- 'armed', 'taken' (another daemon holds the doorbell) or 'busy' (inserting transactions that
-- did not NOTIFY were still open after wait_ms).
SELECT outbox.arm_doorbell(%(wait_ms)s) AS state;

-- name: disarm_doorbell
-- This daemon has a backlog and claims without being woken: INSERTs stop NOTIFYing.
SELECT outbox.disarm_doorbell() AS released;

-- name: status_line
-- For the systemd STATUS= line and the gauges: the backlog, its oldest row, the failed rows.
SELECT
    (SELECT count(*) FROM outbox.events WHERE status = 'pending') AS backlog,
    (SELECT extract(epoch FROM now() - min(created_at))
       FROM outbox.events WHERE status = 'pending') AS oldest_pending_seconds,
    (SELECT count(*) FROM outbox.events WHERE status = 'failed') AS failed;
