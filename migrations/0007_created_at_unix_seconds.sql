-- outbox 0007: payload.created_at is Unix time in whole seconds.
--
-- Partnero's create-transaction call takes `created_at` as an integer Unix timestamp (backdating
-- the transaction). A sale whose payload carried an ISO string, a JavaScript Date serialised by
-- JSON.stringify, a PHP DateTime or milliseconds (Date.now()) was accepted here and then refused
-- by Partnero with a 422 hours later, or, for milliseconds, would have backdated nothing a person
-- could recognise. The insert contract now refuses it at once, with the named rule
-- created_at_is_unix_seconds: payload.created_at, when present, is a JSON number written as 1 to
-- 11 digits: 0 to 99999999999 (up to the year 5138), no sign, no fraction (1764504000.0 too is
-- refused: Partnero validates an integer), and 13-digit milliseconds are refused.
-- payload.customer.created_at (Partnero takes a date string there) is not this rule's business.
--
-- Only new rows are checked: rows already recorded keep their payloads (a bad one still fails
-- alone, as `validation_error`, when Partnero refuses it). The rest of the function is 0006's,
-- unchanged.

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
