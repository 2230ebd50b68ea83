"""`outbox web`: the page support and finance staff use (issue 16).

A small server-rendered application (aiohttp's server, Jinja2 templates with autoescape, one
stylesheet, no JavaScript) over the operator commands' own functions (outbox/ops/commands.py):
every page shows what `outbox status | failed | show` shows, and its actions are `outbox retry |
discard` with the signed-in user as the actor. docs/web.md says how to run it.

Routes and form fields (a browser test is written against these; keep them stable):

    GET  /healthz                no authentication, no data: 200 "ok" when the database answers
    GET  /static/app.css         the stylesheet
    GET  /login                  form: username, password, next (hidden), csrf (hidden)
    POST /login                  303 to `next` (a path on this site) or /; 401 and the form again
    POST /logout                 form: csrf; 303 to /login
    GET  /                       overview: headline (all is well / attention needed), counts
                                 linking to /rows?status=failed|blocked|skipped, pending,
                                 sending paused or not, the chart (inline SVG), the status lines
                                 and the groups that are not delivered (ops.attention: it reads
                                 no delivered row, so it stays quick on a large table)
    GET  /status                 every row by type, status and outcome (`outbox status`)
    GET  /rows                   failed and blocked rows, newest first. Query: status
                                 (failed|blocked|skipped), outcome, http_status, since, until
                                 (30m, 2h, 7d or an ISO time), key, customer, type
                                 (signup|sale|refund), page, limit. Operators see a checkbox
                                 `ids` per row and two buttons posting to the previews
    GET  /rows/{id}              one event: its lines as `outbox show`, HTTP calls, actions
    GET  /key?key=K              every event of a transaction key, in delivery order
    GET  /customer?customer=C    a customer's signups, sales and their refunds, in order
    GET  /actions/{id}           one operator action: who, when, why, the rows it changed
    POST /actions/retry/preview    form: csrf, and `ids` (repeated, or one field of ids
    POST /actions/discard/preview  separated by commas or spaces) or the /rows filter fields;
                                 discard also `refunds` (keep|discard|release, default keep).
                                 Answers a page listing exactly the rows the action would
                                 change (the ops function's dry run), with a form to confirm
    POST /actions/retry          form: csrf, ids (the ids previewed), reason (required);
    POST /actions/discard        discard also refunds. 303 to /rows/{id} for one id, else to
                                 /actions/{action id}; 409 with the CLI's message when refused
    GET  /api/status             = `outbox status --json`
    GET  /api/rows?...           = `outbox failed --json` (the /rows query parameters)
    GET  /api/rows/{id}          = `outbox show ID --json`
    GET  /api/key?key=K          = `outbox show --key K --json`
    GET  /api/customer?customer=C  = `outbox show --customer C --json`

Authentication: a session cookie (after /login), HTTP Basic for GET /api/..., or a trusted
proxy's header (--trust-proxy-header). Without a credential a GET page redirects (303) to
/login; the API and every POST answer 401. A POST without a valid csrf field answers 403 and
changes nothing; an action by a viewer answers 403. Errors: 400 a bad filter or form, 404 an
unknown row, 409 an action the ops function refuses, 503 the database away.
"""
