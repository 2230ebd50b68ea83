"""`outbox web`: the pages, the JSON mirror and the actions, with the server really listening on
loopback over a real seeded database, driven with httpx like a browser (cookies, forms, CSRF
tokens). One server and one database for the module; the tests that act take rows of their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from outbox import db
from outbox.dev import pgtemp
from outbox.web.app import SECURITY_HEADERS
from tests.daemon_helpers import rows
from tests.test_ops_seed import cli, cli_json, seed, snapshot
from tests.web.server import PASSWORDS, SECRET, Browser, WebServer, config, signed_in

XSS = "<img src=x onerror=alert(1)>"
ODD = "INV/7?page=2#top and more"


def _add_row(engine: sa.Engine, key: str, customer: str, body: str) -> int:
    """A failed sale with one attempt whose answer is `body`."""
    with engine.begin() as conn:
        event_id = conn.execute(
            sa.text("SELECT outbox.record_sale(:k, :c, 10, 'EUR', CAST(:p AS jsonb))"),
            {"k": key, "c": customer, "p": json.dumps({"note": body})},
        ).scalar_one()
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'failed', outcome = 'rejected', attempts = 1, "
                "last_status_code = 400, last_error = :err WHERE id = :id"
            ),
            {"id": event_id, "err": f"rejected: 400 {body}"},
        )
        conn.execute(
            sa.text(
                "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, "
                "path, status_code, response_excerpt, decision, daemon) VALUES (:e, 1, now(), "
                "now(), 'POST', '/v1/transactions', 400, :body, 'failed:rejected', 'host-a:1')"
            ),
            {"e": event_id, "body": body},
        )
    return int(event_id)


@pytest.fixture(scope="module")
def shared(databases: pgtemp.DatabaseFactory) -> Iterator[tuple[str, sa.Engine, dict[str, int]]]:
    url = databases.create_migrated()
    eng = db.create_engine(url, poolclass=sa.NullPool)
    ids = seed(eng)
    ids["xss"] = _add_row(eng, XSS, XSS, f'{{"message": "{XSS}"}}')
    ids["odd"] = _add_row(eng, ODD, "cus odd/1", '{"message": "no"}')
    yield url, eng, ids
    eng.dispose()
    databases.drop(url)


@pytest.fixture(scope="module")
def server(shared: tuple[str, sa.Engine, dict[str, int]]) -> Iterator[WebServer]:
    with WebServer(shared[0], [config()]) as running:
        yield running


@pytest.fixture(scope="module")
def alice(server: WebServer) -> Iterator[Browser]:
    browser = signed_in(server.url(), "alice")
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def victor(server: WebServer) -> Iterator[Browser]:
    browser = signed_in(server.url(), "victor")
    yield browser
    browser.close()


@pytest.fixture
def anonymous(server: WebServer) -> Iterator[Browser]:
    browser = Browser(server.url())
    yield browser
    browser.close()


@pytest.fixture
def engine(shared: tuple[str, sa.Engine, dict[str, int]]) -> sa.Engine:
    return shared[1]


@pytest.fixture
def database_url(shared: tuple[str, sa.Engine, dict[str, int]]) -> str:
    return shared[0]


@pytest.fixture
def ids(shared: tuple[str, sa.Engine, dict[str, int]]) -> dict[str, int]:
    return shared[2]


def basic(name: str = "alice") -> httpx.BasicAuth:
    return httpx.BasicAuth(name, PASSWORDS[name])


# ---- authentication ------------------------------------------------------------------------


def test_healthz_answers_without_a_credential_and_says_nothing_else(anonymous: Browser) -> None:
    response = anonymous.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok")


def test_without_a_credential_pages_redirect_to_login_and_the_rest_is_401(
    anonymous: Browser, engine: sa.Engine, ids: dict[str, int]
) -> None:
    before = snapshot(engine)
    page = anonymous.get("/rows?outcome=timeout")
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/rows?outcome%3Dtimeout"
    for path in ("/api/status", "/api/rows", f"/api/rows/{ids['network']}"):
        response = anonymous.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Basic")
        assert response.json() == {"error": "sign in first"}
    for path in ("/actions/retry", "/actions/retry/preview", "/actions/discard", "/logout"):
        response = anonymous.post(path, {"ids": str(ids["network"]), "reason": "x"}, csrf=False)
        assert response.status_code == 401, path
    assert snapshot(engine) == before


def test_an_unknown_name_costs_a_password_hash_like_a_known_one(
    server: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signing in (by the form or HTTP Basic) with a name no one has still runs scrypt, so the
    answer's time does not say which names exist."""
    from outbox.web import auth

    checked: list[str] = []
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        checked.append(stored)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    browser = Browser(server.url())
    try:
        assert browser.login("nobody", "x").status_code == 401
    finally:
        browser.close()
    basic = httpx.get(server.url() + "/api/status", auth=("nobody", "x"), timeout=30)
    assert basic.status_code == 401
    assert len(checked) == 2 and all(stored.startswith("scrypt$") for stored in checked)


def test_login_logout_and_a_wrong_password(server: WebServer) -> None:
    browser = Browser(server.url())
    try:
        wrong = browser.login("alice", "not-her-password")
        assert wrong.status_code == 401
        assert "Wrong name or password" in wrong.text
        assert browser.login("nobody", "x").status_code == 401
        ok = browser.login("alice")
        assert (ok.status_code, ok.headers["location"]) == (303, "/")
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=28800" in cookie
        overview = browser.get("/")
        assert overview.status_code == 200 and "alice (operator)" in overview.text
        old = dict(browser.client.cookies)
        assert browser.post("/logout", {}).status_code == 303
        assert browser.get("/").status_code == 303
        # The old cookie, replayed, no longer signs anyone in.
        replay = httpx.get(server.url() + "/", cookies=old, follow_redirects=False)
        assert replay.status_code == 303
    finally:
        browser.close()


def test_login_without_a_csrf_token_is_refused(server: WebServer) -> None:
    browser = Browser(server.url())
    try:
        browser.get("/login")
        response = browser.post(
            "/login", {"username": "alice", "password": PASSWORDS["alice"]}, csrf=False
        )
        assert response.status_code == 403
        assert "set-cookie" not in response.headers
    finally:
        browser.close()


def test_a_post_without_a_valid_csrf_token_is_403_and_changes_nothing(
    alice: Browser, engine: sa.Engine, ids: dict[str, int]
) -> None:
    before = snapshot(engine)
    form = {"ids": str(ids["server"]), "reason": "try again"}
    for token in (None, "", "forged", alice.csrf[:-2] + "xx"):
        data = form if token is None else {**form, "csrf": token}
        response = alice.client.post("/actions/retry", data=data)
        assert response.status_code == 403, token
    # Another session's token is not this session's.
    other = signed_in(alice.client.base_url.__str__(), "alice")
    try:
        response = alice.client.post("/actions/retry", data={**form, "csrf": other.csrf})
        assert response.status_code == 403
    finally:
        other.close()
    assert snapshot(engine) == before


def test_a_viewer_reads_but_sees_no_buttons_and_may_not_act(
    victor: Browser, engine: sa.Engine, ids: dict[str, int]
) -> None:
    listed = victor.get("/rows")
    assert listed.status_code == 200 and "victor (viewer)" in listed.text
    detail = victor.get(f"/rows/{ids['server']}")
    for page in (listed, detail):
        assert "/actions/retry" not in page.text and "/actions/discard" not in page.text
    before = snapshot(engine)
    for path in ("/actions/retry/preview", "/actions/retry", "/actions/discard"):
        response = victor.post(path, {"ids": str(ids["server"]), "reason": "because"})
        assert response.status_code == 403, path
    assert snapshot(engine) == before


# ---- the pages -----------------------------------------------------------------------------


def test_the_overview_says_what_needs_attention_with_counts_links_and_a_chart(
    alice: Browser, database_url: str
) -> None:
    page = alice.get("/")
    assert page.status_code == 200
    html = page.text
    status = cli_json("status", database_url=database_url)
    assert "Attention needed" in html
    for problem in status["problems"]:
        assert _still(problem) in _still(html)
    assert 'href="/rows?status=failed"' in html
    assert 'href="/rows?status=blocked"' in html
    assert 'href="/rows?status=skipped"' in html
    assert f'<span class="number">{status["totals"]["failed"]}</span> failed' in html
    assert "host-a:101" in html  # the daemon holding a lease
    assert "last call" in html
    svg = re.search(r"<svg class=\"chart\".*?</svg>", html, re.S)
    assert svg is not None
    assert 'role="img"' in svg.group(0) and 'aria-label="HTTP calls' in svg.group(0)
    assert "<title>HTTP calls to Partnero per minute" in svg.group(0)
    # The seed's attempts of the last 24 hours are drawn (bars), with axis labels and a legend:
    # retries and failures (its deliveries are days old).
    for series in ("retry", "failed"):
        bars = rf'<path class="bars-{series}" fill="#[0-9a-f]{{6}}" d="M[^"]+z"/>'
        assert re.search(bars, svg.group(0)), series
    assert "bars-delivered" not in svg.group(0)
    assert ">now</text>" in svg.group(0)
    assert "failed (needs a person)" in html


def test_the_overview_counts_what_is_not_delivered_and_status_counts_every_row(
    alice: Browser, database_url: str
) -> None:
    """The overview reads no delivered row (ops.attention); /status is `outbox status` whole."""
    status = cli_json("status", database_url=database_url)
    groups = [
        (c["event_type"], c["status"], c["outcome"] or "-", c["events"]) for c in status["counts"]
    ]
    row = '<tr><td>{}</td><td>{}</td><td>{}</td>\n      <td class="num">{}</td>'
    overview, every = alice.get("/").text, alice.get("/status").text
    for group in groups:
        assert (row.format(*group) in overview) == (group[1] != "delivered"), group
        assert row.format(*group) in every, group
    assert 'href="/status"' in overview
    assert f'<span class="number">{status["totals"]["skipped"]}</span> skipped' in overview


def test_the_rows_page_filters_like_outbox_failed_and_links_each_row(
    alice: Browser, database_url: str, ids: dict[str, int]
) -> None:
    for query, args in (
        ("", []),
        ("?outcome=timeout", ["--outcome", "timeout"]),
        ("?status=blocked", ["--state", "blocked"]),
        ("?http_status=503", ["--status-code", "503"]),
        ("?since=4h&type=sale", ["--since", "4h", "--type", "sale"]),
        ("?customer=cus_emil", ["--customer", "cus_emil"]),
    ):
        page = alice.get("/rows" + query)
        assert page.status_code == 200, query
        expected = [r["id"] for r in cli_json("failed", *args, database_url=database_url)["rows"]]
        shown = [int(i) for i in re.findall(r'<td class="num"><a href="/rows/(\d+)">', page.text)]
        assert shown == expected, query
    bad = alice.get("/rows?since=2x")
    assert bad.status_code == 400
    assert "since: &#39;2x&#39; is not a duration" in bad.text


def test_the_rows_page_pages_newest_first(alice: Browser, database_url: str) -> None:
    first = alice.get("/rows?limit=3")
    second = alice.get("/rows?limit=3&page=2")
    ids_of = lambda r: [int(i) for i in re.findall(r'href="/rows/(\d+)">', r.text)]  # noqa: E731
    expected = [r["id"] for r in cli_json("failed", database_url=database_url)["rows"]]
    assert ids_of(first) + ids_of(second) == expected[:6]
    assert 'href="/rows?limit=3&amp;page=2" rel="next"' in first.text or "page=2" in first.text


def test_a_row_shows_what_outbox_show_says_every_call_and_every_action(
    alice: Browser, ids: dict[str, int]
) -> None:
    for name in ("invalid", "rejected", "network", "timeout", "server", "rate", "bad", "forbidden"):
        page = alice.get(f"/rows/{ids[name]}").text
        assert '<p class="means">' in page, name
    assert "Correct the data at the source" in alice.get(f"/rows/{ids['invalid']}").text
    skipped = alice.get(f"/rows/{ids['unknown']}").text
    assert '<p class="means">' not in skipped
    assert "Partnero does not know this customer (never referred)" in skipped
    assert "answer 1 for inv_unknown" in skipped  # the answer excerpt
    blocked = alice.get(f"/rows/{ids['dropped_refund']}").text
    assert "waits for" in blocked and f"#{ids['dropped']}" in blocked
    key = alice.get("/key", params={"key": "inv_refunded"}).text
    assert key.index(f"event {ids['refunded_sale']}") < key.index(f"event {ids['deleted']}")
    customer = alice.get("/customer", params={"customer": "cus_anna"})
    assert customer.status_code == 200 and f"event {ids['signed_up']}" in customer.text
    assert alice.get("/rows/999999").status_code == 404
    assert alice.get("/key", params={"key": "nope"}).status_code == 404


# ---- the JSON mirror -----------------------------------------------------------------------

_MOVING = {"age_seconds", "oldest_age_seconds", "checked_at", "last_delivery_age_seconds",
           "oldest_waiting_age_seconds", "expires_in_seconds"}  # fmt: skip


def _still(value: Any) -> Any:
    """The JSON without the fields that move with the clock between two reads."""
    if isinstance(value, dict):
        return {k: _still(v) for k, v in value.items() if k not in _MOVING}
    if isinstance(value, list):
        return [_still(v) for v in value]
    if isinstance(value, str):  # `the oldest pending row has waited 20m01s (...)`
        return re.sub(r"waited \S+", "waited (a while)", value)
    return value


def test_the_json_mirror_is_the_clis_json(
    alice: Browser, database_url: str, ids: dict[str, int]
) -> None:
    pairs = [
        ("/api/status", ["status"]),
        ("/api/rows", ["failed"]),
        ("/api/rows?outcome=timeout&limit=2", ["failed", "--outcome", "timeout", "--limit", "2"]),
        ("/api/rows?status=failed&page=2&limit=3", ["failed", "--state", "failed", "--limit",
                                                     "3", "--page", "2"]),
        (f"/api/rows/{ids['timeout']}", ["show", str(ids["timeout"])]),
        ("/api/key?key=inv_ghost", ["show", "--key", "inv_ghost"]),
        ("/api/customer?customer=cus_anna", ["show", "--customer", "cus_anna"]),
    ]  # fmt: skip
    for path, args in pairs:
        response = httpx.get(alice.client.base_url.join(path), auth=basic("victor"))
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("application/json")
        got = response.json()
        result = cli(*args, "--json", database_url=database_url)
        expected = json.loads(result.stdout)
        assert list(got) == list(expected), path
        assert _still(got) == _still(expected), path
    wrong = httpx.get(alice.client.base_url.join("/api/status"), auth=httpx.BasicAuth("alice", "x"))
    assert wrong.status_code == 401
    missing = httpx.get(alice.client.base_url.join("/api/rows/999999"), auth=basic())
    assert (missing.status_code, missing.json()) == (404, {"error": "no event with id 999999"})


# ---- escaping, odd keys, headers, secrets --------------------------------------------------


def test_a_key_made_of_markup_is_text_everywhere(alice: Browser, ids: dict[str, int]) -> None:
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    pages = [
        alice.get("/rows"),
        alice.get(f"/rows/{ids['xss']}"),
        alice.get("/key", params={"key": XSS}),
        alice.get("/customer", params={"customer": XSS}),
        alice.post("/actions/retry/preview", {"ids": str(ids["xss"])}),
        alice.post("/actions/discard/preview", {"key": XSS}),
        alice.get("/rows", params={"key": XSS}),
    ]
    for page in pages:
        assert page.status_code == 200, page.url
        assert XSS not in page.text, page.url
        assert "<img" not in page.text, page.url
        assert escaped in page.text, page.url
    api = httpx.get(alice.client.base_url.join(f"/api/rows/{ids['xss']}"), auth=basic())
    assert api.headers["content-type"].startswith("application/json")
    assert api.json()["event"]["transaction_key"] == XSS
    assert api.json()["event"]["payload"] == {"note": f'{{"message": "{XSS}"}}'}
    # An action whose reason is markup: the row's history and the action's record.
    done = alice.post("/actions/retry", {"ids": str(ids["xss"]), "reason": XSS})
    assert done.status_code == 303
    history = alice.get(done.headers["location"]).text
    (record_link,) = re.findall(r'href="(/actions/\d+)"', history)
    for page in (history, alice.get(record_link).text):
        assert XSS not in page and "<img" not in page
        assert f"reason: {escaped}" in page or f"<dd>{escaped}</dd>" in page


def test_keys_with_slash_question_mark_hash_and_spaces_round_trip_through_links(
    alice: Browser, ids: dict[str, int]
) -> None:
    listed = alice.get("/rows", params={"key": ODD}).text
    links = re.findall(r'href="(/key\?key=[^"]+)"', listed)
    assert links == ["/key?key=INV%2F7%3Fpage%3D2%23top+and+more"]
    shown = alice.get(links[0])
    assert shown.status_code == 200 and f"event {ids['odd']}" in shown.text
    customer_links = re.findall(r'href="(/customer\?customer=[^"]+)"', shown.text)
    assert "/customer?customer=cus+odd%2F1" in customer_links
    assert alice.get(customer_links[0]).status_code == 200


def test_every_answer_carries_the_security_headers(
    alice: Browser, anonymous: Browser, victor: Browser
) -> None:
    answers = [
        anonymous.get("/login"),
        anonymous.get("/"),
        anonymous.get("/api/status"),
        anonymous.get("/static/app.css"),
        anonymous.get("/healthz"),
        alice.get("/"),
        alice.get("/rows/999999"),
        alice.get("/rows?page=x"),
        victor.post("/actions/retry", {"ids": "1", "reason": "x"}),
    ]
    for answer in answers:
        for name, value in SECURITY_HEADERS.items():
            if name != "Cache-Control":  # the stylesheet may be cached
                assert answer.headers.get(name) == value, (answer.url, name)
    assert answers[3].headers["content-type"].startswith("text/css")
    assert {a.headers["server"] for a in answers} == {"outbox"}


def test_no_secret_in_pages_headers_or_logs(server: WebServer, ids: dict[str, int]) -> None:
    password = PASSWORDS["alice"]
    with capture_logs() as logs:
        browser = signed_in(server.url(), "alice")
        cookie = browser.client.cookies["outbox_session"]
        answers = [
            browser.get("/"),
            browser.get("/rows"),
            browser.get(f"/rows/{ids['timeout']}"),
            httpx.get(server.url() + "/api/status", auth=basic()),
        ]
        browser.login("alice", "a-wrong-password-9")
        browser.close()
    events = [e for e in logs if e["event"].startswith("outbox.web.")]
    assert any(e["event"] == "outbox.web.request" for e in events)
    assert any(e["event"] == "outbox.web.login_refused" for e in events)
    flat = repr(events)
    for secret in (password, "a-wrong-password-9", cookie, SECRET.decode(), "scrypt$"):
        assert secret not in flat
        for answer in answers:
            assert secret not in answer.text
            assert secret not in repr(dict(answer.headers))


# ---- actions -------------------------------------------------------------------------------


def _changes(page: str) -> list[tuple[int, str]]:
    """(event id, change) of the preview's table."""
    found = re.findall(r'<tr><td class="num"><a href="/rows/(\d+)">\d+</a></td>.*?<td>(retry|'
                       r'discard|release|wake)</td>', page, re.S)  # fmt: skip
    return [(int(i), c) for i, c in found]


def test_retry_preview_shows_exactly_the_rows_then_retry_records_the_user_and_reason(
    alice: Browser, engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    before = snapshot(engine)
    preview = alice.post("/actions/retry/preview", {"ids": str(ids["network"])})
    assert preview.status_code == 200
    assert snapshot(engine) == before  # a preview changes nothing
    dry = cli_json("retry", str(ids["network"]), "--dry-run", database_url=database_url)
    assert _changes(preview.text) == [(c["event_id"], c["change"]) for c in dry["changes"]]
    assert 'name="reason" required' in preview.text
    confirmed = re.findall(r'<input type="hidden" name="ids" value="(\d+)">', preview.text)
    assert confirmed == [str(ids["network"])]

    missing_reason = alice.post("/actions/retry", {"ids": str(ids["network"]), "reason": "  "})
    assert missing_reason.status_code == 400
    assert snapshot(engine) == before

    with capture_logs() as logs:
        done = alice.post("/actions/retry", {"ids": str(ids["network"]), "reason": "net fixed"})
    assert (done.status_code, done.headers["location"]) == (303, f"/rows/{ids['network']}")
    (logged,) = [e for e in logs if e["event"] == "outbox.web.action"]
    assert (logged["action"], logged["user"], logged["events"], logged["count"]) == (
        "retry",
        "alice",
        [ids["network"]],
        1,
    )
    (row,) = rows(engine, "SELECT status, attempts FROM outbox.events WHERE id = :i",
                  i=ids["network"])  # fmt: skip
    assert tuple(row) == ("pending", 0)
    (action,) = rows(
        engine,
        "SELECT a.actor, a.action, a.reason FROM outbox.operator_actions a JOIN "
        "outbox.operator_action_events e ON e.action_id = a.id WHERE e.event_id = :i",
        i=ids["network"],
    )
    assert tuple(action) == ("alice", "retry", "net fixed")
    history = alice.get(done.headers["location"]).text
    assert "retry</strong> by alice" in history and "reason: net fixed" in history


def test_retry_by_filter_previews_the_filtered_rows(
    alice: Browser, engine: sa.Engine, database_url: str
) -> None:
    before = snapshot(engine)
    preview = alice.post("/actions/retry/preview", {"outcome": "rate_limited"})
    dry = cli_json("retry", "--outcome", "rate_limited", "--dry-run", database_url=database_url)
    assert _changes(preview.text) == [(c["event_id"], c["change"]) for c in dry["changes"]]
    refused = alice.post("/actions/retry/preview", {"status": "blocked"})
    assert refused.status_code == 400 and "retry takes failed rows" in refused.text
    for nothing in ({}, {"status": "skipped"}, {"status": ""}):
        refused = alice.post("/actions/retry/preview", nothing)
        assert refused.status_code == 400 and "say which rows" in refused.text, nothing
    skipped = alice.post("/actions/retry/preview", {"status": "skipped", "type": "sale"})
    dry = cli_json("retry", "--status", "skipped", "--type", "sale", "--dry-run",
                   database_url=database_url)  # fmt: skip
    assert _changes(skipped.text) == [(c["event_id"], c["change"]) for c in dry["changes"]]
    assert snapshot(engine) == before


def test_discard_with_its_refunds_choice_previews_then_records(
    alice: Browser, engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    sale, refund = ids["ghost"], ids["ghost_refund"]
    keep = alice.post("/actions/discard/preview", {"ids": str(sale)})
    assert _changes(keep.text) == [(sale, "discard")]
    assert f"Refund {refund} (inv_ghost) stays blocked" in keep.text
    preview = alice.post("/actions/discard/preview", {"ids": str(sale), "refunds": "discard"})
    dry = cli_json("discard", str(sale), "--refunds", "discard", "--dry-run",
                   database_url=database_url)  # fmt: skip
    assert _changes(preview.text) == [(c["event_id"], c["change"]) for c in dry["changes"]]
    assert _changes(preview.text) == [(sale, "discard"), (refund, "discard")]
    assert '<input type="hidden" name="refunds" value="discard">' in preview.text
    done = alice.post(
        "/actions/discard", {"ids": str(sale), "refunds": "discard", "reason": "test order"}
    )
    assert (done.status_code, done.headers["location"]) == (303, f"/rows/{sale}")
    found = rows(engine, "SELECT id, status FROM outbox.events WHERE id IN (:a, :b) ORDER BY id",
                 a=sale, b=refund)  # fmt: skip
    assert [tuple(r) for r in found] == [(sale, "discarded"), (refund, "discarded")]
    (action,) = rows(engine, "SELECT actor, action, reason, selection FROM "
                     "outbox.operator_actions WHERE action = 'discard'")  # fmt: skip
    assert tuple(action)[:3] == ("alice", "discard", "test order")
    assert action.selection == {"ids": [sale], "refunds": "discard"}
    again = alice.post("/actions/discard", {"ids": str(refund), "reason": "twice"})
    assert again.status_code == 409 and "discarded already" in again.text


def _forms(page: str) -> list[dict[str, str]]:
    """The action forms of a row's page: where each posts, its fields and its button."""
    found = []
    forms = re.findall(r'<form method="post" action="(/actions/[^"]+)">(.*?)</form>', page, re.S)
    for action, body in forms:
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', body))
        (label,) = re.findall(r"<button[^>]*>([^<]+)</button>", body)
        found.append({"action": action, "label": label, **fields})
    return found


def test_a_row_behind_a_discarded_sale_offers_what_outbox_show_says(
    alice: Browser, database_url: str, ids: dict[str, int]
) -> None:
    sale, refund = ids["dropped"], ids["dropped_refund"]
    offered = _forms(alice.get(f"/rows/{refund}").text)
    assert [(f["action"], f["ids"], f.get("refunds")) for f in offered] == [
        ("/actions/discard/preview", str(sale), "release"),
        ("/actions/discard/preview", str(refund), None),
    ]
    release = {k: v for k, v in offered[0].items() if k in ("ids", "refunds")}
    preview = alice.post("/actions/discard/preview", release)
    dry = cli_json("discard", str(sale), "--refunds", "release", "--dry-run",
                   database_url=database_url)  # fmt: skip
    assert _changes(preview.text) == [(c["event_id"], c["change"]) for c in dry["changes"]]
    assert _changes(preview.text) == [(refund, "release")]
    on_the_sale = _forms(alice.get(f"/rows/{sale}").text)
    assert [(f["action"], f.get("refunds")) for f in on_the_sale] == [
        ("/actions/retry/preview", None),
        ("/actions/discard/preview", "release"),
        ("/actions/discard/preview", "discard"),
    ]


def test_an_action_on_several_rows_lands_on_its_record(
    alice: Browser, engine: sa.Engine, ids: dict[str, int]
) -> None:
    both = f"{ids['invalid']},{ids['bad']}"
    done = alice.post("/actions/retry", {"ids": both, "reason": "payload fixed"})
    assert done.status_code == 303 and done.headers["location"].startswith("/actions/")
    record = alice.get(done.headers["location"])
    assert record.status_code == 200
    assert "payload fixed" in record.text and "alice" in record.text
    assert f'href="/rows/{ids["invalid"]}"' in record.text
    assert f'href="/rows/{ids["bad"]}"' in record.text


def test_every_reason_a_row_may_fail_with_has_a_plain_sentence() -> None:
    from outbox.ops.model import FAILED_OUTCOMES
    from outbox.web.present import FAILED_MEANS

    assert set(FAILED_MEANS) == set(FAILED_OUTCOMES)
