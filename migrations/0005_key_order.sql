-- outbox 0005: the order of a key's rows, written once.
--
-- "Row p goes before row c of the same transaction key" (every sale before every refund, then
-- by id) was written out three times: in the claim query and in the views
-- outbox.failed_deliveries (rows_waiting) and outbox.blocked_deliveries (blocked_by_*). A
-- change to one copy and not the others would make `outbox failed` and `outbox status` disagree
-- with what the daemon does. The rule is now the function outbox.goes_before, which the claim
-- query and both views call.
--
-- It is a single SQL expression, IMMUTABLE, neither STRICT nor SECURITY DEFINER and without SET,
-- so the planner inlines it: the claim's plan is the same as with the expression written out
-- (tests/test_key_order.py compares them). Inlined or not, the role that runs the query needs
-- EXECUTE on it: PUBLIC has that unless a DBA revoked it, and outbox/sql/roles.sql grants it to
-- the daemon's role as well (run it again after this migration).
--
-- The views keep their columns, their order and their comments (CREATE OR REPLACE VIEW); what
-- they return does not change, and nothing else does.

-- Whether the row (earlier_type, earlier_id) goes before the row (later_type, later_id) of the
-- same transaction key: a sale goes before every refund and before the later sales; a refund
-- goes before the later refunds only; no row goes before itself. A row waits for every row of
-- its key that goes before it and is not settled yet.
CREATE FUNCTION outbox.goes_before(
    earlier_type text,
    earlier_id   bigint,
    later_type   text,
    later_id     bigint
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN later_type = 'sale'
                THEN earlier_type = 'sale' AND earlier_id < later_id
                ELSE earlier_type = 'sale' OR earlier_id < later_id END
$$;

COMMENT ON FUNCTION outbox.goes_before(text, bigint, text, bigint) IS
    'Per-key delivery order: true when the first row (type, id) goes before the second one of '
    'the same transaction key (every sale before every refund, then by id). Inlined by the '
    'planner; used by the claim query and the views failed_deliveries and blocked_deliveries.';

CREATE OR REPLACE VIEW outbox.failed_deliveries AS
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
          AND outbox.goes_before(e.event_type, e.id, w.event_type, w.id)) AS rows_waiting
FROM outbox.events e
WHERE e.status = 'failed';

CREATE OR REPLACE VIEW outbox.blocked_deliveries AS
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
            AND outbox.goes_before(p.event_type, p.id, e.event_type, e.id))
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
