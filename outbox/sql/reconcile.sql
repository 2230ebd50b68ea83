-- `outbox reconcile` (outbox/ops/reconcile.py), loaded by name with
-- outbox.queries.get(name, "reconcile.sql"); run through SQLAlchemy's text(): parameters are
-- :name, an optional filter is NULL when not given.

-- name: range_now
-- The database's clock: a duration given as --since / --from / --to counts back from it.
SELECT now()

-- name: key_rows
-- Every sale and refund of the keys that have a sale or refund recorded (created_at) in
-- [:range_from, :range_to), narrowed to :keys when given. A key's rows outside the range come
-- too: a sale of the 30th refunded on the 2nd is reversed, whatever month is being closed.
-- Signups (no transaction key) are not read.
WITH keys AS (
    SELECT DISTINCT transaction_key
    FROM outbox.events
    WHERE event_type IN ('sale', 'refund')
      AND created_at >= CAST(:range_from AS timestamptz)
      AND created_at < CAST(:range_to AS timestamptz)
      AND (CAST(:keys AS text[]) IS NULL OR transaction_key = ANY(CAST(:keys AS text[])))
)
SELECT e.id, e.event_type, e.transaction_key, e.status, e.outcome, e.amount, e.currency,
       e.created_at
FROM outbox.events e
JOIN keys k ON k.transaction_key = e.transaction_key
WHERE e.event_type IN ('sale', 'refund')
ORDER BY e.transaction_key, e.id

-- name: keys_here
-- The listing's unknown_here: which of :keys have any sale or refund here, at any time.
SELECT DISTINCT transaction_key
FROM outbox.events
WHERE event_type IN ('sale', 'refund')
  AND transaction_key = ANY(CAST(:keys AS text[]))
