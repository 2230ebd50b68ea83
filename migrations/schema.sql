-- The canonical outbox schema: what applying every migrations/NNNN_*.sql in order gives.
-- tests/test_migrate.py checks that the two never drift apart. When you add a migration, bring
-- this file up to date as well. `outbox migrate` never applies it; it is for reading and review.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE outbox.events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,

    -- The columns an application sets.
    event_type       text,
    transaction_key  text,
    customer_key     text,
    amount           numeric,
    currency         text,
    payload          jsonb,

    -- The columns the daemon owns. An INSERT leaves them at their defaults.
    status           text        NOT NULL DEFAULT 'pending',
    outcome          text,
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lookup_required  boolean     NOT NULL DEFAULT false,
    parked           boolean     NOT NULL DEFAULT false,
    order_released   boolean     NOT NULL DEFAULT false,  -- 0002: a person released a refund
    lease_owner      text,
    lease_token      uuid,
    lease_expires_at timestamptz,
    last_error       text,
    last_status_code integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz

    -- The insert contract and the daemon's bookkeeping rules are checked by the triggers
    -- events_check_insert_contract and events_check_bookkeeping (0003).
);

COMMENT ON TABLE outbox.events IS
    'Signup, sale and refund events for Partnero. Applications INSERT event_type, '
    'transaction_key, customer_key, amount, currency and payload; every other column belongs to '
    'the outbox daemon.';

-- What the claim query reads: only pending rows, oldest due first. A backlog of millions of
-- delivered rows is not in this index and costs the claim nothing.
CREATE INDEX events_pending_due_idx ON outbox.events (next_attempt_at, id) WHERE status = 'pending';
-- Per-key order (predecessor checks), `outbox show --key`, the blocked view.
CREATE INDEX events_transaction_key_idx ON outbox.events (transaction_key, id);
-- Failed rows are few and read by operators.
CREATE INDEX events_failed_idx ON outbox.events (updated_at) WHERE status = 'failed';

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
        WHEN (NEW.payload IS NULL
              OR jsonb_typeof(NEW.payload) <> 'object'
              OR NOT NEW.payload ? 'created_at'
              OR (jsonb_typeof(NEW.payload -> 'created_at') = 'number'
                  AND (NEW.payload ->> 'created_at') ~ '^[0-9]{1,11}$')) IS FALSE
            THEN 'created_at_is_unix_seconds'
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
            WHEN 'created_at_is_unix_seconds'
                THEN 'payload.created_at, if present, is Unix time in whole seconds (an integer, '
                     'not milliseconds, not a date string).'
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

CREATE TRIGGER events_check_bookkeeping
    BEFORE UPDATE OF status, outcome, attempts, lease_token, lease_expires_at ON outbox.events
    FOR EACH ROW
    EXECUTE FUNCTION outbox.check_bookkeeping();

-- Wake a sleeping daemon, once per INSERT statement, only when one is waiting: a daemon that
-- has caught up holds the advisory lock outbox.doorbell in exclusive mode (0003).
CREATE FUNCTION outbox.notify_new_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(-778825528700430751) THEN
        PERFORM pg_notify('outbox_events', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify_daemon
    AFTER INSERT ON outbox.events
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox.notify_new_events();

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

-- One row per HTTP call the daemon made for an event. The API key is never stored here.
CREATE TABLE outbox.attempts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         bigint      NOT NULL REFERENCES outbox.events (id) ON DELETE CASCADE,
    attempt          integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz NOT NULL,
    method           text        NOT NULL,
    path             text        NOT NULL,
    status_code      integer,
    response_excerpt text,
    error            text,
    decision         text        NOT NULL,
    daemon           text
);

CREATE INDEX attempts_event_id_idx ON outbox.attempts (event_id, id);

COMMENT ON TABLE outbox.attempts IS
    'Every HTTP call the outbox daemon made: method, path, status, an excerpt of the answer and '
    'what the daemon decided. Pruned together with delivered events.';

-- Convenience wrappers around the INSERT. Both return the new event id.
CREATE FUNCTION outbox.record_sale(
    transaction_key text,
    customer_key    text,
    amount          numeric,
    currency        text  DEFAULT NULL,
    payload         jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, currency, payload)
    VALUES ('sale', transaction_key, customer_key, amount, currency, payload)
    RETURNING id;
$$;

CREATE FUNCTION outbox.record_refund(
    transaction_key text,
    customer_key    text  DEFAULT NULL,
    payload         jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO outbox.events (event_type, transaction_key, customer_key, payload)
    VALUES ('refund', transaction_key, customer_key, payload)
    RETURNING id;
$$;

-- ---- 0002: the operator surface ------------------------------------------------------------

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
    transaction_key   text,  -- NULL for a signup (0006)
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

-- ---- 0005: the order of a key's rows, written once ----------------------------------------

-- Whether the row (earlier_type, earlier_id) goes before the row (later_type, later_id) of the
-- same transaction key: a sale goes before every refund and before the later sales; a refund
-- goes before the later refunds only; no row goes before itself. A row waits for every row of
-- its key that goes before it and is not settled yet. One SQL expression, IMMUTABLE, not STRICT,
-- no SET, not SECURITY DEFINER: the planner inlines it into the claim query and the views below.
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

-- Failed rows: they need a person (`outbox failed`, `outbox retry`, `outbox discard`).
-- rows_waiting counts the pending rows of the same key that wait for this one
-- (docs/design.md, "Delivery rules" 2).
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

COMMENT ON VIEW outbox.failed_deliveries IS
    'Failed events (they need a person) with the reason, last HTTP status, attempts, and how '
    'many pending rows of the same transaction key wait for them.';

-- Pending rows that cannot be sent until a person acts: a failed row ahead of them in their
-- key's order (every sale before every refund, then by id: outbox.goes_before, as in the claim), or, for a
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

-- ---- 0006: signups, and the customers no partner ever referred ----------------------------

CREATE FUNCTION outbox.record_signup(
    customer_key text,
    payload      jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO outbox.events (event_type, customer_key, payload)
    VALUES ('signup', customer_key, payload)
    RETURNING id;
$$;

-- Order per customer: the signups of a sale's customer (the claim, the blocked view), and the
-- parked sales to wake when a signup settles (complete) or to count behind a failed signup;
-- the parked rows of a key to wake when a row of it settles (complete).
CREATE INDEX IF NOT EXISTS events_signup_customer_idx
    ON outbox.events (customer_key, id) WHERE event_type = 'signup';
CREATE INDEX IF NOT EXISTS events_parked_customer_idx
    ON outbox.events (customer_key) WHERE parked AND status = 'pending';
CREATE INDEX IF NOT EXISTS events_parked_key_idx
    ON outbox.events (transaction_key) WHERE parked AND status = 'pending';
-- `outbox prune`: settled rows (delivered, skipped, discarded) by when they settled.
CREATE INDEX IF NOT EXISTS events_settled_idx
    ON outbox.events ((coalesce(delivered_at, updated_at)))
    WHERE status IN ('delivered', 'skipped', 'discarded');

-- ---- 0008: the overview's indexes ---------------------------------------------------------

-- What needs a person, counted without reading the delivered rows (`outbox web`'s overview,
-- with events_pending_due_idx for the pending ones).
CREATE INDEX IF NOT EXISTS events_not_delivered_idx ON outbox.events
    (event_type, status, outcome) INCLUDE (created_at)
    WHERE status IN ('failed', 'discarded', 'skipped');
-- The overview's chart: the last 24 hours of calls.
CREATE INDEX IF NOT EXISTS attempts_started_at_idx ON outbox.attempts (started_at);
