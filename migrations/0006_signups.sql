-- outbox 0006: signups, and the customers no partner ever referred.
--
-- Partnero's integration guide has the shop send every signup (POST /v1/customers, attributed
-- through the partnero_partner cookie) and every purchase, and says it ignores purchases of
-- customers it does not know. Until now outbox sent purchases only and treated Partnero's
-- normal answer for a never-referred customer ("400 Customer not found") as an error that
-- ended `failed` after a few hours of retries.
--
-- 1. The insert contract takes `signup` rows: customer_key required; no transaction_key, amount
--    or currency; payload.partner (the partner reference: key, id or email), if present, an
--    object. New named rules, checked in the same alphabetical order as the others:
--    signup_has_no_amount, signup_has_no_currency, signup_has_no_transaction_key,
--    signup_partner_is_object, signup_requires_customer_key. transaction_key_required now
--    applies to sales and refunds. outbox.record_signup(customer_key, payload) wraps the INSERT.
-- 2. The status `skipped`: settled with nothing (more) to send, by rule, needing no one. Its
--    outcomes: not_referred (a signup without a partner reference: no call), invalid_partner
--    (400 Invalid partner key), customer_not_found (a sale of a customer Partnero does not
--    know), sale_skipped (a refund whose sale was skipped: no call). Rule
--    skipped_has_skipped_outcome keeps the two consistent. Existing failed/customer_not_found
--    rows are left as they are.
-- 3. Order per customer: a sale waits while a signup of its customer_key is pending, and waits
--    visibly behind a failed one (outbox.blocked_deliveries names it; a failed signup's
--    rows_waiting counts those sales). events_signup_customer_idx serves that check, and
--    events_parked_customer_idx finds the sales to wake when a signup settles. Its twin
--    events_parked_key_idx does the same for the rows of a key that settled: without it, on a
--    table autoanalyze had not seen yet, the planner intersected the key index with the whole
--    pending index for every settled key (3.2 s per 1,000 results on a fresh 100,000-row
--    backlog; 33 ms with it).
-- 4. `outbox prune` deletes settled rows (delivered and skipped, and discarded when asked) by
--    when they settled, through one index, events_settled_idx, which replaces the two it had
--    (events_delivered_at_idx, events_discarded_idx).
-- 5. operator_action_events.transaction_key may be NULL: a signup has none.
--
-- The views keep their columns (CREATE OR REPLACE VIEW); the daemon's role needs no new grant
-- (outbox/sql/roles.sql grants outbox_app EXECUTE on record_signup: run it again).

CREATE OR REPLACE FUNCTION outbox.check_insert_contract() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    broken text;
BEGIN
    IF TG_OP = 'INSERT'
       AND (NEW.status IS DISTINCT FROM 'pending'
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
            OR NEW.updated_at IS DISTINCT FROM now()) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox',
            TABLE = 'events',
            CONSTRAINT = 'daemon_owned_columns_not_insertable',
            MESSAGE = 'new row for relation "events" violates rule "daemon_owned_columns_not_insertable"',
            DETAIL = 'An application sets only event_type, transaction_key, customer_key, amount, '
                     'currency and payload; status, outcome, attempts, lease and timing columns '
                     'belong to the outbox daemon and keep their defaults.',
            HINT = 'Leave the other columns out of the INSERT.';
    END IF;

    broken := CASE
        WHEN (NEW.amount < 100000000000) IS FALSE
            THEN 'amount_below_100_billion'
        WHEN (NEW.amount = round(NEW.amount, 4)) IS FALSE
            THEN 'amount_max_4_decimal_places'
        WHEN (NEW.currency ~ '^[A-Z]{3}$') IS FALSE
            THEN 'currency_is_iso_4217_code'
        WHEN (length(NEW.customer_key) <= 255) IS FALSE
            THEN 'customer_key_max_255_characters'
        WHEN (NEW.customer_key !~ '[[:cntrl:]]') IS FALSE
            THEN 'customer_key_no_control_characters'
        WHEN (NEW.customer_key !~ '^\s|\s$') IS FALSE
            THEN 'customer_key_no_surrounding_whitespace'
        WHEN (NEW.customer_key IS NULL OR length(NEW.customer_key) > 0) IS FALSE
            THEN 'customer_key_not_empty'
        WHEN NOT coalesce(NEW.event_type IN ('sale', 'refund', 'signup'), false)
            THEN 'event_type_known'
        WHEN (NEW.payload IS NULL
              OR NOT NEW.payload ? 'customer'
              OR jsonb_typeof(NEW.payload -> 'customer') = 'object') IS FALSE
            THEN 'payload_customer_is_object'
        WHEN (NEW.payload IS NULL
              OR NOT (NEW.payload ?| ARRAY['key', 'amount', 'action', 'amount_units'])) IS FALSE
            THEN 'payload_does_not_override_columns'
        WHEN (NEW.payload IS NULL
              OR NOT coalesce(NEW.payload -> 'customer' ? 'key', false)) IS FALSE
            THEN 'payload_does_not_override_customer_key'
        WHEN (NEW.payload IS NULL OR NOT NEW.payload ? 'transactions') IS FALSE
            THEN 'payload_has_no_bulk_transactions'
        WHEN (NEW.payload IS NULL OR jsonb_typeof(NEW.payload) = 'object') IS FALSE
            THEN 'payload_is_json_object'
        WHEN (NEW.event_type IS DISTINCT FROM 'refund' OR NEW.amount IS NULL) IS FALSE
            THEN 'refund_has_no_amount'
        WHEN (NEW.event_type IS DISTINCT FROM 'refund' OR NEW.currency IS NULL) IS FALSE
            THEN 'refund_has_no_currency'
        WHEN (NEW.event_type IS DISTINCT FROM 'sale' OR NEW.amount IS NOT NULL) IS FALSE
            THEN 'sale_requires_amount'
        WHEN (NEW.event_type IS DISTINCT FROM 'sale' OR NEW.customer_key IS NOT NULL) IS FALSE
            THEN 'sale_requires_customer_key'
        WHEN (NEW.event_type IS DISTINCT FROM 'sale' OR NEW.amount > 0) IS FALSE
            THEN 'sale_requires_positive_amount'
        WHEN (NEW.event_type IS DISTINCT FROM 'signup' OR NEW.amount IS NULL) IS FALSE
            THEN 'signup_has_no_amount'
        WHEN (NEW.event_type IS DISTINCT FROM 'signup' OR NEW.currency IS NULL) IS FALSE
            THEN 'signup_has_no_currency'
        WHEN (NEW.event_type IS DISTINCT FROM 'signup' OR NEW.transaction_key IS NULL) IS FALSE
            THEN 'signup_has_no_transaction_key'
        WHEN (NEW.event_type IS DISTINCT FROM 'signup'
              OR NEW.payload IS NULL
              OR NOT NEW.payload ? 'partner'
              OR jsonb_typeof(NEW.payload -> 'partner') IN ('object', 'null')) IS FALSE
            THEN 'signup_partner_is_object'
        WHEN (NEW.event_type IS DISTINCT FROM 'signup' OR NEW.customer_key IS NOT NULL) IS FALSE
            THEN 'signup_requires_customer_key'
        WHEN (length(NEW.transaction_key) <= 255) IS FALSE
            THEN 'transaction_key_max_255_characters'
        WHEN (NEW.transaction_key !~ '[[:cntrl:]]') IS FALSE
            THEN 'transaction_key_no_control_characters'
        WHEN (NEW.transaction_key !~ '^\s|\s$') IS FALSE
            THEN 'transaction_key_no_surrounding_whitespace'
        WHEN (NEW.transaction_key NOT IN ('.', '..')) IS FALSE
            THEN 'transaction_key_not_dot_segment'
        WHEN NOT (NEW.event_type = 'signup' OR coalesce(length(NEW.transaction_key) > 0, false))
            THEN 'transaction_key_required'
    END;
    IF broken IS NULL THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        SCHEMA = 'outbox',
        TABLE = 'events',
        CONSTRAINT = broken,
        MESSAGE = 'new row for relation "events" violates check constraint "' || broken || '"',
        DETAIL = 'See the rule in docs/insert-contract.md: ' || CASE broken
            WHEN 'amount_below_100_billion' THEN 'amount must be a number below 100000000000.'
            WHEN 'amount_max_4_decimal_places' THEN 'amount has at most 4 decimal places.'
            WHEN 'currency_is_iso_4217_code' THEN 'currency is NULL or three capital letters (EUR).'
            WHEN 'customer_key_max_255_characters' THEN 'customer_key has at most 255 characters.'
            WHEN 'customer_key_no_control_characters' THEN 'customer_key has no control characters.'
            WHEN 'customer_key_no_surrounding_whitespace'
                THEN 'customer_key neither starts nor ends with whitespace.'
            WHEN 'customer_key_not_empty' THEN 'customer_key is NULL or not empty.'
            WHEN 'event_type_known' THEN 'event_type is ''sale'', ''refund'' or ''signup''.'
            WHEN 'payload_customer_is_object' THEN 'payload.customer, if present, is an object.'
            WHEN 'payload_does_not_override_columns'
                THEN 'payload has no key, amount, action or amount_units: those come from columns.'
            WHEN 'payload_does_not_override_customer_key'
                THEN 'payload.customer has no key: it comes from the customer_key column.'
            WHEN 'payload_has_no_bulk_transactions'
                THEN 'payload has no transactions list: one row is one transaction.'
            WHEN 'payload_is_json_object' THEN 'payload is NULL or a JSON object.'
            WHEN 'refund_has_no_amount' THEN 'a refund has no amount (it reverses its sale).'
            WHEN 'refund_has_no_currency' THEN 'a refund has no currency.'
            WHEN 'sale_requires_amount' THEN 'a sale has an amount.'
            WHEN 'sale_requires_customer_key' THEN 'a sale has a customer_key.'
            WHEN 'sale_requires_positive_amount' THEN 'a sale''s amount is above 0.'
            WHEN 'signup_has_no_amount' THEN 'a signup has no amount.'
            WHEN 'signup_has_no_currency' THEN 'a signup has no currency.'
            WHEN 'signup_has_no_transaction_key'
                THEN 'a signup has no transaction_key (its customer_key identifies it).'
            WHEN 'signup_partner_is_object'
                THEN 'payload.partner, if present, is an object (key, id or email).'
            WHEN 'signup_requires_customer_key' THEN 'a signup has a customer_key.'
            WHEN 'transaction_key_max_255_characters'
                THEN 'transaction_key has at most 255 characters.'
            WHEN 'transaction_key_no_control_characters'
                THEN 'transaction_key has no control characters.'
            WHEN 'transaction_key_no_surrounding_whitespace'
                THEN 'transaction_key neither starts nor ends with whitespace.'
            WHEN 'transaction_key_not_dot_segment' THEN 'transaction_key is not . or ..'
            WHEN 'transaction_key_required'
                THEN 'a sale or refund has a transaction_key, not empty.'
        END;
END
$$;

CREATE OR REPLACE FUNCTION outbox.check_bookkeeping() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    broken text;
BEGIN
    broken := CASE
        WHEN (NEW.attempts >= 0) IS FALSE
            THEN 'attempts_not_negative'
        WHEN (NEW.status <> 'delivered'
              OR NEW.outcome IN ('created', 'duplicate', 'deleted', 'not_found')) IS FALSE
            THEN 'delivered_has_delivered_outcome'
        WHEN ((NEW.lease_token IS NULL) = (NEW.lease_expires_at IS NULL)) IS FALSE
            THEN 'lease_complete_or_absent'
        WHEN (NEW.outcome IS NULL OR NEW.outcome IN (
                'created', 'duplicate', 'deleted', 'not_found',
                'customer_not_found', 'validation_error', 'rejected', 'network_error',
                'timeout', 'server_error', 'rate_limited', 'bad_response', 'forbidden',
                'not_referred', 'invalid_partner', 'sale_skipped')) IS FALSE
            THEN 'outcome_known'
        WHEN (NEW.status <> 'skipped' OR NEW.outcome IN (
                'not_referred', 'invalid_partner', 'customer_not_found', 'sale_skipped')) IS FALSE
            THEN 'skipped_has_skipped_outcome'
        WHEN (NEW.status IN ('pending', 'delivered', 'skipped', 'failed', 'discarded')) IS FALSE
            THEN 'status_known'
    END;
    IF broken IS NULL THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        SCHEMA = 'outbox',
        TABLE = 'events',
        CONSTRAINT = broken,
        MESSAGE = 'new row for relation "events" violates check constraint "' || broken || '"';
END
$$;

CREATE FUNCTION outbox.record_signup(
    customer_key text,
    payload      jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO outbox.events (event_type, customer_key, payload)
    VALUES ('signup', customer_key, payload)
    RETURNING id;
$$;

ALTER TABLE outbox.operator_action_events ALTER COLUMN transaction_key DROP NOT NULL;

CREATE INDEX IF NOT EXISTS events_signup_customer_idx
    ON outbox.events (customer_key, id) WHERE event_type = 'signup';
CREATE INDEX IF NOT EXISTS events_parked_customer_idx
    ON outbox.events (customer_key) WHERE parked AND status = 'pending';
CREATE INDEX IF NOT EXISTS events_parked_key_idx
    ON outbox.events (transaction_key) WHERE parked AND status = 'pending';
CREATE INDEX IF NOT EXISTS events_settled_idx
    ON outbox.events ((coalesce(delivered_at, updated_at)))
    WHERE status IN ('delivered', 'skipped', 'discarded');
DROP INDEX IF EXISTS outbox.events_delivered_at_idx;
DROP INDEX IF EXISTS outbox.events_discarded_idx;

COMMENT ON TABLE outbox.events IS
    'Signup, sale and refund events for Partnero. Applications INSERT event_type, '
    'transaction_key, customer_key, amount, currency and payload; every other column belongs to '
    'the outbox daemon.';

-- rows_waiting of a failed signup also counts the sales parked behind it.
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
          AND outbox.goes_before(e.event_type, e.id, w.event_type, w.id))
       + (SELECT count(*)
          FROM outbox.events w
          WHERE e.event_type = 'signup'
            AND w.parked
            AND w.customer_key = e.customer_key
            AND w.event_type = 'sale'
            AND w.status = 'pending') AS rows_waiting
FROM outbox.events e
WHERE e.status = 'failed';

-- blocked_by_* of a sale may be a failed signup of its customer.
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
    SELECT x.id, x.event_type, x.status, x.outcome
    FROM (
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
        UNION ALL
        -- A sale waits for every signup of its customer (0006).
        SELECT u.id, u.event_type, u.status, u.outcome
        FROM outbox.events u
        WHERE e.event_type = 'sale'
          AND u.event_type = 'signup'
          AND u.customer_key = e.customer_key
          AND u.status = 'failed'
    ) x
    ORDER BY x.status = 'failed' DESC, x.event_type = 'signup' DESC, x.id
    LIMIT 1
) b
WHERE e.status = 'pending';
