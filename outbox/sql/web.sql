-- The web page's own queries (outbox/web/store.py), loaded by name with
-- outbox.db.queries.get(name, "web.sql"); parameters are :name (SQLAlchemy's text()). Everything
-- else the pages show comes from the operator commands' functions (outbox/ops/commands.py).

-- name: activity_window
-- The chart's window: :minutes whole minutes ending with the current one (the database's clock).
SELECT date_trunc('minute', now()) - make_interval(mins => CAST(:minutes AS integer) - 1) AS first,
       date_trunc('minute', now()) AS last

-- name: activity
-- HTTP calls per minute since :first, by what the daemon decided (outbox.attempts.decision,
-- `kind:detail`): delivered (delivered:*, and lookup:found: the earlier create had landed),
-- skipped (skipped:*), retry (retry:*, pause:auth and forbidden:check_key: the row is tried
-- again), failed (failed:*: a person is needed); other (lookup:absent, lookup:next_page:N: a
-- step of a lookup, followed by its own call) is counted but not drawn.
SELECT date_trunc('minute', started_at) AS minute,
       CASE
           WHEN decision LIKE 'delivered:%' OR decision = 'lookup:found' THEN 'delivered'
           WHEN decision LIKE 'skipped:%' THEN 'skipped'
           WHEN decision LIKE 'failed:%' THEN 'failed'
           WHEN decision LIKE 'retry:%' OR decision LIKE 'pause:%'
                OR decision LIKE 'forbidden:%' THEN 'retry'
           ELSE 'other'
       END AS kind,
       count(*) AS calls
FROM outbox.attempts
WHERE started_at >= CAST(:first AS timestamptz)
GROUP BY 1, 2
ORDER BY 1, 2

-- name: action
-- One operator action (the page shown after a retry or discard).
SELECT id, at, actor, action, reason, event_count
FROM outbox.operator_actions
WHERE id = :id

-- name: action_events
-- The rows one operator action changed, with their state before, by event id.
SELECT event_id, event_type, transaction_key, change, previous_status, previous_outcome,
       previous_attempts
FROM outbox.operator_action_events
WHERE action_id = :id
ORDER BY event_id

-- name: ping
-- /healthz: the database answers.
SELECT 1
