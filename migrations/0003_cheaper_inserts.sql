-- outbox 0003: the same insert contract, at about half the cost per INSERT for the application.
--
-- 1. The contract's rules move from 25 CHECK constraints into one row trigger. Postgres rebuilds
--    every CHECK expression of a table for each INSERT statement (parse, plan, compile), which
--    for these 25 rules cost more than the rest of a one-row INSERT; a PL/pgSQL trigger compiles
--    its expressions once per session. The rules, their names, their order, the SQLSTATE
--    (23514, check_violation), the constraint name in the error and the message text stay as
--    they were; the DETAIL line now says what the rule wants instead of echoing the whole row
--    (which put customer data into application logs). The trigger also runs for an UPDATE that
--    sets a contract column, as the CHECK constraints did. The five rules about the daemon's
--    own bookkeeping (status_known, ...) move into a trigger on UPDATE for the same reason.
--
-- 2. NOTIFY only when a daemon is waiting for it. A transaction that NOTIFYs takes a database-
--    wide lock at commit, so every INSERT into the outbox used to commit one at a time, WAL
--    flush included. Now a daemon that has caught up and goes to sleep "arms the doorbell": it
--    holds the advisory lock outbox.doorbell (key -778825528700430751) in exclusive mode, and
--    the statement trigger NOTIFYs only when it cannot take that lock in share mode. While every
--    daemon is busy working through a backlog (or none runs) an INSERT does not NOTIFY, and
--    the busy daemons claim its row in their next round anyway. The share lock an INSERT takes
--    lasts until its transaction ends: a daemon arming the doorbell waits (briefly, with a lock
--    timeout) until every transaction that inserted without ringing has ended, then claims once
--    more before it sleeps, so no committed row is left waiting for a NOTIFY that never comes.
--    Polling every OUTBOX_POLL_INTERVAL_SECONDS remains the fallback.

ALTER TABLE outbox.events
    DROP CONSTRAINT event_type_known,
    DROP CONSTRAINT transaction_key_required,
    DROP CONSTRAINT transaction_key_no_surrounding_whitespace,
    DROP CONSTRAINT transaction_key_no_control_characters,
    DROP CONSTRAINT transaction_key_max_255_characters,
    DROP CONSTRAINT transaction_key_not_dot_segment,
    DROP CONSTRAINT sale_requires_customer_key,
    DROP CONSTRAINT customer_key_not_empty,
    DROP CONSTRAINT customer_key_no_surrounding_whitespace,
    DROP CONSTRAINT customer_key_no_control_characters,
    DROP CONSTRAINT customer_key_max_255_characters,
    DROP CONSTRAINT sale_requires_amount,
    DROP CONSTRAINT sale_requires_positive_amount,
    DROP CONSTRAINT amount_max_4_decimal_places,
    DROP CONSTRAINT amount_below_100_billion,
    DROP CONSTRAINT refund_has_no_amount,
    DROP CONSTRAINT currency_is_iso_4217_code,
    DROP CONSTRAINT refund_has_no_currency,
    DROP CONSTRAINT payload_is_json_object,
    DROP CONSTRAINT payload_does_not_override_columns,
    DROP CONSTRAINT payload_customer_is_object,
    DROP CONSTRAINT payload_does_not_override_customer_key,
    DROP CONSTRAINT payload_has_no_bulk_transactions,
    DROP CONSTRAINT status_known,
    DROP CONSTRAINT outcome_known,
    DROP CONSTRAINT delivered_has_delivered_outcome,
    DROP CONSTRAINT attempts_not_negative,
    DROP CONSTRAINT lease_complete_or_absent;

DROP TRIGGER events_refuse_daemon_owned_columns ON outbox.events;
DROP FUNCTION outbox.refuse_daemon_owned_columns();

-- The insert contract. A rule is broken when its test is false; a NULL passes, as in a CHECK
-- constraint (the rules about required values catch the NULLs). The first broken rule, in the
-- alphabetical order Postgres checks constraints in, is the one reported; the daemon-owned
-- columns come first, as their trigger used to fire before the constraints.
CREATE FUNCTION outbox.check_insert_contract() RETURNS trigger
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
        WHEN NOT coalesce(NEW.event_type IN ('sale', 'refund'), false)
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
        WHEN (length(NEW.transaction_key) <= 255) IS FALSE
            THEN 'transaction_key_max_255_characters'
        WHEN (NEW.transaction_key !~ '[[:cntrl:]]') IS FALSE
            THEN 'transaction_key_no_control_characters'
        WHEN (NEW.transaction_key !~ '^\s|\s$') IS FALSE
            THEN 'transaction_key_no_surrounding_whitespace'
        WHEN (NEW.transaction_key NOT IN ('.', '..')) IS FALSE
            THEN 'transaction_key_not_dot_segment'
        WHEN NOT coalesce(length(NEW.transaction_key) > 0, false)
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
            WHEN 'event_type_known' THEN 'event_type is ''sale'' or ''refund''.'
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
            WHEN 'transaction_key_max_255_characters'
                THEN 'transaction_key has at most 255 characters.'
            WHEN 'transaction_key_no_control_characters'
                THEN 'transaction_key has no control characters.'
            WHEN 'transaction_key_no_surrounding_whitespace'
                THEN 'transaction_key neither starts nor ends with whitespace.'
            WHEN 'transaction_key_not_dot_segment' THEN 'transaction_key is not . or ..'
            WHEN 'transaction_key_required' THEN 'transaction_key is set and not empty.'
        END;
END
$$;

CREATE TRIGGER events_check_insert_contract
    BEFORE INSERT OR UPDATE OF event_type, transaction_key, customer_key, amount, currency, payload
    ON outbox.events
    FOR EACH ROW
    EXECUTE FUNCTION outbox.check_insert_contract();

-- The daemon's own bookkeeping stays consistent. These were CHECK constraints too; on an INSERT
-- they only ever met the defaults (the contract refuses anything else), yet Postgres rebuilt
-- them for every INSERT statement, which cost an application's one-row INSERT as much as the
-- whole contract. Now they are checked when an UPDATE sets one of their columns (the daemon's
-- claims and completions, the operator commands, anyone's manual SQL), with the same names.
CREATE FUNCTION outbox.check_bookkeeping() RETURNS trigger
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
                'timeout', 'server_error', 'rate_limited', 'bad_response')) IS FALSE
            THEN 'outcome_known'
        WHEN (NEW.status IN ('pending', 'delivered', 'failed', 'discarded')) IS FALSE
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

CREATE TRIGGER events_check_bookkeeping
    BEFORE UPDATE OF status, outcome, attempts, lease_token, lease_expires_at ON outbox.events
    FOR EACH ROW
    EXECUTE FUNCTION outbox.check_bookkeeping();

-- Wake a sleeping daemon, once per INSERT statement, only when one is waiting (see 2. above).
CREATE OR REPLACE FUNCTION outbox.notify_new_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(-778825528700430751) THEN
        PERFORM pg_notify('outbox_events', '');
    END IF;
    RETURN NULL;
END
$$;

-- For the daemon, on the connection it claims with, when it has caught up: 'armed' (this
-- session now holds the doorbell; INSERTs NOTIFY until it disarms or disconnects), 'taken'
-- (another daemon holds it or is arming it: INSERTs NOTIFY already), or 'busy' (transactions
-- that inserted without ringing were still open after wait_ms: claim again and retry).
CREATE FUNCTION outbox.arm_doorbell(wait_ms integer) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(-778825528700430751) THEN
        RETURN 'taken';
    END IF;
    BEGIN
        PERFORM set_config('lock_timeout', greatest(wait_ms, 1) || 'ms', true);
        PERFORM pg_advisory_lock(-778825528700430751);
    EXCEPTION WHEN lock_not_available THEN
        RETURN 'busy';
    END;
    RETURN 'armed';
END
$$;

-- For the daemon, when it finds a backlog: INSERTs stop ringing, and a NOTIFY wakes any other
-- daemon that slept because this one held the doorbell.
CREATE FUNCTION outbox.disarm_doorbell() RETURNS boolean
LANGUAGE sql AS $$
    SELECT pg_notify('outbox_events', '');
    SELECT pg_advisory_unlock(-778825528700430751);
$$;
