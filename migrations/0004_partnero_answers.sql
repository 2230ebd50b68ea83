-- outbox 0004: Partnero's answers read as Partnero means them.
--
-- The daemon now reaches Partnero only through calls that work for every key: a refund is
-- DELETE /v1/transactions with the key in the JSON body, and the lookup before re-creating a
-- sale is the documented list filter GET /v1/transactions?key=... (Partnero percent-decodes the
-- path before it matches routes, so a key holding "/" never reached /v1/transactions/{key}).
-- Only Partnero's own answers are outcomes; a 403 on one row while GET /v1/test still works
-- fails that row alone, with the new reason class 'forbidden', which this migration allows.
--
-- Rows already in flight need nothing else: lookup_required still means "an earlier call may
-- have reached Partnero", so a sale flagged by the old daemon is looked up through the list
-- filter by the new one before it is created again, and a refund flagged that way is sent
-- again in the body form. Delivered rows are not touched.

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
                'timeout', 'server_error', 'rate_limited', 'bad_response', 'forbidden')) IS FALSE
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
