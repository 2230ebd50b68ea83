-- outbox: three least-privilege roles: for applications, for the daemon, and for the people
-- (and `outbox web`) who look at rows and retry or discard them.
--
-- Run it as the role that ran `outbox migrate` (the owner of the outbox schema), in the shop's
-- database, after every `outbox migrate`: it is idempotent, and grants made on a table survive
-- its later ALTERs. Roles belong to the whole PostgreSQL cluster, grants to one database. Only
-- the owner may grant on the schema's objects; only an administrator may create roles (see the
-- DO block below).
--
--     psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f outbox/sql/roles.sql
--
-- The roles are NOLOGIN groups. Give each program (and each person) a login role of its own and
-- make it a member, so that passwords and connection limits stay per program (an administrator
-- does this):
--
--     CREATE ROLE shop_app LOGIN PASSWORD '...' IN ROLE outbox_app;
--     CREATE ROLE partnero_sync LOGIN PASSWORD '...' IN ROLE outbox_daemon;
--     CREATE ROLE outbox_web LOGIN PASSWORD '...' IN ROLE outbox_operator;
--
-- To use other names, replace outbox_app, outbox_daemon and outbox_operator throughout this
-- file (`outbox roles-sql --app-role ... --daemon-role ... --operator-role ...` does).
--
-- outbox_app: may only add events. INSERT on the six contract columns, SELECT on `id` only
-- (for `INSERT ... RETURNING id`, which outbox.record_sale/record_refund/record_signup and the
-- Python helpers use: they are SECURITY INVOKER, so they run with the caller's rights and need
-- exactly these). The identity column, the column defaults and the triggers (the insert
-- contract, which also guards the daemon-owned columns, and the doorbell NOTIFY) need no further
-- privilege. It cannot read events back, change or delete them, or see outbox.attempts.
--
-- outbox_daemon: exactly what `outbox run` does. SELECT and UPDATE on outbox.events (claim with
-- FOR UPDATE SKIP LOCKED, complete, rescue, the status line), INSERT on outbox.attempts (its
-- identity column needs nothing more; `RETURNING 1` reads no column), SELECT on
-- outbox.schema_migrations (the start-up check that the schema is current), EXECUTE on
-- outbox.arm_doorbell/disarm_doorbell (so that INSERTs NOTIFY only while it waits) and on
-- outbox.goes_before (the claim's per-key order: the planner inlines it, yet a role that may
-- not execute it cannot claim; PUBLIC may, unless a DBA revoked that). LISTEN and pg_notify need
-- no privilege. It cannot INSERT or DELETE events, read or change attempts, or create anything.
--
-- outbox_operator: what `outbox status | failed | show | retry | discard | reconcile` and
-- `outbox web` do. SELECT on every outbox table and view, UPDATE on outbox.events (retry and
-- discard change status, attempts and due time; the bookkeeping trigger still guards every
-- change), INSERT on the two operator-action tables (who did what, and why), EXECUTE on
-- outbox.goes_before (the views' per-key order). It cannot INSERT or DELETE events or attempts,
-- change the schema, or prune: `outbox prune` and `outbox migrate` run as the schema owner.

-- The three groups are created here when the caller may create roles. The schema owner usually
-- may not (CREATEROLE is an administrator's right): then an administrator creates them first,
-- with the two CREATE ROLE statements the error names, and the owner runs this file again.
DO $$
DECLARE
    missing text[] := ARRAY(SELECT name
                              FROM unnest(ARRAY['outbox_app', 'outbox_daemon', 'outbox_operator'])
                                   WITH ORDINALITY AS wanted(name, position)
                             WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                                               WHERE rolname = name)
                             ORDER BY position);
BEGIN
    IF cardinality(missing) = 0 THEN
        RETURN;
    END IF;
    IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_catalog.pg_roles
            WHERE rolname = current_user) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = format('role(s) %s do not exist and role %s may not create roles',
                             array_to_string(missing, ', '), current_user),
            HINT = format('Have an administrator (a superuser or a role with CREATEROLE) run: %s '
                          'Then run this file again as the owner of schema outbox.',
                          (SELECT string_agg(format('CREATE ROLE %I NOLOGIN;', name), ' ')
                             FROM unnest(missing) AS name));
    END IF;
    -- (COMMENT ON ROLE, too, needs CREATEROLE: so only where the role is created here.)
    IF 'outbox_app' = ANY (missing) THEN
        CREATE ROLE outbox_app NOLOGIN;
        COMMENT ON ROLE outbox_app IS 'outbox: applications; may only INSERT into outbox.events';
    END IF;
    IF 'outbox_daemon' = ANY (missing) THEN
        CREATE ROLE outbox_daemon NOLOGIN;
        COMMENT ON ROLE outbox_daemon IS 'outbox: the outbox run daemon; exactly what it needs';
    END IF;
    IF 'outbox_operator' = ANY (missing) THEN
        CREATE ROLE outbox_operator NOLOGIN;
        COMMENT ON ROLE outbox_operator IS 'outbox: operators and outbox web; read, retry, discard';
    END IF;
END
$$;


-- Start from nothing (a table-level REVOKE also takes back column grants), so that running this
-- again after a change removes what is no longer granted.
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM outbox_app, outbox_daemon, outbox_operator;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM outbox_app, outbox_daemon, outbox_operator;
REVOKE ALL ON SCHEMA outbox FROM outbox_app, outbox_daemon, outbox_operator;

-- Applications.
GRANT USAGE ON SCHEMA outbox TO outbox_app;
GRANT INSERT (event_type, transaction_key, customer_key, amount, currency, payload)
    ON outbox.events TO outbox_app;
GRANT SELECT (id) ON outbox.events TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.record_sale(text, text, numeric, text, jsonb),
                          outbox.record_refund(text, text, jsonb),
                          outbox.record_signup(text, jsonb)
    TO outbox_app;

-- The daemon.
GRANT USAGE ON SCHEMA outbox TO outbox_daemon;
GRANT SELECT, UPDATE ON outbox.events TO outbox_daemon;
GRANT INSERT ON outbox.attempts TO outbox_daemon;
GRANT SELECT ON outbox.schema_migrations TO outbox_daemon;
GRANT EXECUTE ON FUNCTION outbox.arm_doorbell(integer), outbox.disarm_doorbell(),
                          outbox.goes_before(text, bigint, text, bigint)
    TO outbox_daemon;

-- Operators and `outbox web`.
GRANT USAGE ON SCHEMA outbox TO outbox_operator;
GRANT SELECT, UPDATE ON outbox.events TO outbox_operator;
GRANT SELECT ON outbox.attempts, outbox.schema_migrations, outbox.delivery_summary,
                outbox.failed_deliveries, outbox.blocked_deliveries
    TO outbox_operator;
GRANT SELECT, INSERT ON outbox.operator_actions, outbox.operator_action_events
    TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.goes_before(text, bigint, text, bigint) TO outbox_operator;
