"""The fake Partnero server's customers (signups), over real HTTP on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from outbox.dev.fake_partnero import ODD_ANSWERS, FakeConfig, FakePartnero, FakePartneroThread
from tests.test_fake_partnero import (
    API_KEY,
    AUTH,
    check_odd,
    check_odd_logged,
    route_404,
    sale,
)

PARTNER_1 = {"key": "partner_1", "id": 1, "email": "partner1@example.com"}
INVALID = "The given data was invalid."
CUSTOMER_NOT_FOUND = {"message": "Customer not found", "status": 0}


def signup(key: Any, partner: Any = None, **fields: Any) -> dict[str, Any]:
    """A customer create body, referred by partner_1 unless told otherwise."""
    return {"key": key, "partner": partner or {"key": "partner_1"}, **fields}


@pytest.fixture
async def fake() -> AsyncIterator[FakePartnero]:
    """Strict, as Partnero is: a sale needs its customer in the registry."""
    server = FakePartnero(FakeConfig(api_key=API_KEY, seed=7, customers_must_exist=True))
    await server.start()
    yield server  # pytest runs the rest even when the test fails
    await server.stop()


@pytest.fixture
async def client(fake: FakePartnero) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH, timeout=10) as http:
        yield http


def log_rows(fake: FakePartnero, *names: str) -> list[tuple[Any, ...]]:
    return [tuple(e.get(name) for name in names) for e in fake.requests()]


# ---- create and read -----------------------------------------------------------------------------


async def test_create_then_read(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    body = signup(
        "cus_1",
        email="Ann@Example.com",
        name="Ann",
        surname="Lee",
        tags=["vip", "eu"],
        options={"referral_url": "https://shop.example/?ref=p1"},
    )
    created = await client.post("/v1/customers", json=body)
    assert created.status_code == 201
    assert created.json()["status"] == 1
    data = created.json()["data"]
    assert data | {"created_at": None} == {
        "key": "cus_1",
        "email": "Ann@Example.com",
        "name": "Ann",
        "surname": "Lee",
        "tags": ["vip", "eu"],
        "referral_url": "https://shop.example/?ref=p1",
        "partner": PARTNER_1,
        "created_at": None,
    }
    assert data["created_at"].endswith("Z")
    read = await client.get("/v1/customers/cus_1")
    assert (read.status_code, read.json()) == (200, {"data": data, "status": 1})
    missing = await client.get("/v1/customers/cus_2")
    assert (missing.status_code, missing.json()) == (404, CUSTOMER_NOT_FOUND)
    [customer] = (await client.get("/_fake/ledger")).json()["customers"]
    assert customer == {
        "key": "cus_1",
        "email": "Ann@Example.com",
        "partner": "partner_1",
        "created_seq": 1,
        "created_at": data["created_at"],
        "source": "api",
    }
    assert log_rows(fake, "seq", "method", "resource", "key", "customer_key", "status") == [
        (1, "POST", "customer", "cus_1", "cus_1", 201),
        (2, "GET", "customer", "cus_1", "cus_1", 200),
        (3, "GET", "customer", "cus_2", "cus_2", 404),
    ]
    assert [e["message"] for e in fake.requests()] == [None, None, "Customer not found"]
    assert fake.stats()["customers"] == {"entries": 1, "api": 1, "admin": 0}


@pytest.mark.parametrize(
    "partner",
    [
        {"key": "partner_1"},
        {"id": 1},
        {"id": "1"},
        {"email": "partner1@example.com"},
        {"email": "PARTNER1@Example.COM"},
        {"key": "", "id": None, "email": "partner1@example.com"},
        {"key": "partner_1", "id": 99, "email": "nobody@example.com"},  # the key decides
    ],
)
async def test_partner_matched_by_key_id_or_email(
    fake: FakePartnero, client: httpx.AsyncClient, partner: dict[str, Any]
) -> None:
    resp = await client.post("/v1/customers", json=signup("cus_p", partner))
    assert resp.status_code == 201
    assert resp.json()["data"]["partner"] == PARTNER_1
    assert [c["partner"] for c in fake.customers()] == ["partner_1"]


async def test_partners_are_configurable(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    partners = [PARTNER_1, {"key": "p_two", "id": "abc-2", "email": "two@example.com"}]
    resp = await client.post("/_fake/config", json={"partners": partners})
    assert (resp.status_code, resp.json()["partners"]) == (200, partners)
    for key, partner in (("c1", {"id": "abc-2"}), ("c2", {"email": "two@example.com"})):
        created = await client.post("/v1/customers", json=signup(key, partner))
        assert created.json()["data"]["partner"] == partners[1]
    await fake.configure(partners=[])
    refused = await client.post("/v1/customers", json=signup("c3"))
    assert refused.json() == {"message": "Invalid partner key", "status": 0}
    assert [c["partner"] for c in fake.customers()] == ["p_two", "p_two"]


@pytest.mark.parametrize(
    "bad",
    [
        {"partners": {"key": "p"}},
        {"partners": [{"key": "p", "id": 1}]},
        {"partners": [{"key": "", "id": 1, "email": "a@b"}]},
        {"partners": [{"key": "p", "id": True, "email": "a@b"}]},
        {"partners": [{"key": "p", "id": "", "email": "a@b"}]},
        {"partners": [{"key": "p", "id": 1, "email": None}]},
        {"customers_must_exist": "yes"},
    ],
)
async def test_config_validates_partners_and_strictness(
    fake: FakePartnero, client: httpx.AsyncClient, bad: dict[str, Any]
) -> None:
    resp = await client.post("/_fake/config", json=bad)
    assert resp.status_code == 400
    assert fake.config.partners == [PARTNER_1]
    assert fake.config.customers_must_exist is True


def test_config_defaults_and_copies() -> None:
    config = FakeConfig()
    assert (config.customers_must_exist, config.partners) == (False, [PARTNER_1])
    copy = config.copy()
    copy.partners[0]["key"] = "changed"
    assert config.partners == [PARTNER_1]
    assert FakeConfig().partners is not config.partners


@pytest.mark.parametrize(
    "partner",
    [{"key": "nobody"}, {"id": 99}, {"id": "partner_1"}, {"email": "x@example.com"}],
)
async def test_unknown_partner_is_400(
    fake: FakePartnero, client: httpx.AsyncClient, partner: dict[str, Any]
) -> None:
    resp = await client.post("/v1/customers", json=signup("cus_x", partner))
    assert (resp.status_code, resp.json()) == (400, {"message": "Invalid partner key", "status": 0})
    assert fake.customers() == []
    assert fake.requests()[-1]["message"] == "Invalid partner key"


@pytest.mark.parametrize(
    "body",
    [
        {"key": "cus_n"},
        {"key": "cus_n", "partner": None},
        {"key": "cus_n", "partner": {}},
        {"key": "cus_n", "partner": {"key": "", "id": None, "email": ""}},
        {"key": "cus_n", "partner": {"name": "Partnero"}},
    ],
)
async def test_signup_without_partner_is_ignored(
    fake: FakePartnero, client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    resp = await client.post("/v1/customers", json=body)
    assert (resp.status_code, resp.json()) == (200, {"data": None, "status": 1})
    assert fake.customers() == []
    assert (await client.get("/v1/customers/cus_n")).status_code == 404
    sold = await client.post("/v1/transactions", json=sale("t-n", customer="cus_n"))
    assert (sold.status_code, sold.json()) == (400, CUSTOMER_NOT_FOUND)


async def test_duplicate_key(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    first = signup("cus_d", email="d@example.com")
    assert (await client.post("/v1/customers", json=first)).status_code == 201
    # The same create again (a retry) is a duplicate key, not a taken email.
    for again in (first, signup("cus_d", {"id": 1}, email="other@example.com")):
        resp = await client.post("/v1/customers", json=again)
        assert (resp.status_code, resp.json()) == (422, {"message": "Duplicate key", "status": 0})
    # Without a partner it is ignored, as every unreferred signup.
    ignored = await client.post("/v1/customers", json={"key": "cus_d"})
    assert ignored.json() == {"data": None, "status": 1}
    assert [c["email"] for c in fake.customers()] == ["d@example.com"]


async def test_duplicate_email(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/customers", json=signup("cus_a", email="same@example.com"))
    for email in ("same@example.com", "SAME@example.COM"):
        resp = await client.post("/v1/customers", json=signup("cus_b", email=email))
        assert resp.status_code == 422
        assert resp.json() == {
            "message": INVALID,
            "errors": {"email": ["The email has already been taken."]},
        }
    assert (await client.post("/v1/customers", json=signup("cus_b"))).status_code == 201
    assert [c["key"] for c in fake.customers()] == ["cus_a", "cus_b"]


def required(name: str) -> dict[str, list[str]]:
    return {name: [f"The {name} field is required."]}


def string(name: str) -> dict[str, list[str]]:
    return {name: [f"The {name} field must be a string."]}


def array(name: str) -> dict[str, list[str]]:
    return {name: [f"The {name} field must be an array."]}


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"partner": {"key": "partner_1"}}, required("key")),
        (signup(""), required("key")),
        (signup(None), required("key")),
        (signup(7), string("key")),
        (signup("k" * 256), {"key": ["The key field must not be greater than 255 characters."]}),
        (
            signup("c", email="not an email"),
            {"email": ["The email field must be a valid email address."]},
        ),
        (signup("c", email="a@b@c"), {"email": ["The email field must be a valid email address."]}),
        (signup("c", email=5), string("email")),
        (signup("c", name=1, surname=["x"]), string("name") | string("surname")),
        (signup("c", tags="vip"), array("tags")),
        (signup("c", tags=["ok", 2]), string("tags.1")),
        (signup("c", options=["x"]), array("options")),
        (signup("c", options={"referral_url": 1}), string("options.referral_url")),
        (signup("c", "partner_1"), array("partner")),
        (signup("c", {"key": 1}), string("partner.key")),
        (signup("c", {"id": True}), string("partner.id")),
        (signup("c", {"id": 1, "email": []}), string("partner.email")),
        ([1, 2], required("key")),
    ],
)
async def test_validation(
    fake: FakePartnero, client: httpx.AsyncClient, body: Any, errors: dict[str, list[str]]
) -> None:
    resp = await client.post("/v1/customers", json=body)
    assert (resp.status_code, resp.json()) == (422, {"message": INVALID, "errors": errors})
    assert fake.customers() == []
    assert fake.requests()[-1]["message"] == INVALID


async def test_empty_email_is_absent_and_key_may_be_255(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/customers", json=signup("k" * 255, email=""))
    assert resp.status_code == 201
    assert resp.json()["data"]["email"] is None


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/customers", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert (resp.status_code, resp.json()) == (400, {"message": "Malformed JSON"})


# ---- routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/customers/a%2Fb", "/v1/customers/a/b", "/v1/customers/a%2fb/", "/v1/customers//a"]
)
async def test_key_with_slash_in_a_path_reaches_no_route(
    fake: FakePartnero, client: httpx.AsyncClient, path: str
) -> None:
    assert (await client.post("/v1/customers", json=signup("a/b"))).status_code == 201
    resp = await client.get(path)
    assert (resp.status_code, resp.json()) == (404, route_404(path.strip("/")))
    assert fake.requests()[-1]["resource"] is None


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/v1/customers/a%20b", "a b"),
        ("/v1/customers/a+b", "a+b"),
        ("/v1/customers/100%25", "100%"),
        ("/v1/customers/%C3%BC%E2%82%AC", "ü€"),
        ("/v1/customers/cus_1/", "cus_1"),
    ],
)
async def test_read_decodes_one_segment(
    fake: FakePartnero, client: httpx.AsyncClient, path: str, key: str
) -> None:
    assert (await client.post("/v1/customers", json=signup(key))).status_code == 201
    resp = await client.get(path)
    assert (resp.status_code, resp.json()["data"]["key"]) == (200, key)
    assert fake.requests()[-1]["key"] == key


async def test_methods_not_served(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    for method, path, allowed in (
        ("GET", "/v1/customers", "POST"),
        ("DELETE", "/v1/customers", "POST"),
        ("PUT", "/v1/customers/cus_1", "GET"),
        ("DELETE", "/v1/customers/cus_1", "GET"),
        ("POST", "/v1/customers/cus_1", "GET"),
    ):
        resp = await client.request(method, path)
        assert resp.status_code == 405, (method, path)
        assert resp.headers["Allow"] == allowed
        assert resp.json() == {
            "message": f"The {method} method is not supported for route {path.strip('/')}. "
            f"Supported methods: {allowed}."
        }
    assert fake.customers() == []


async def test_auth_and_forbidden(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as anonymous:
        assert (await anonymous.post("/v1/customers", json=signup("c"))).status_code == 401
        assert (await anonymous.get("/v1/customers/c")).status_code == 401
        assert (await anonymous.put("/v1/customers/c")).status_code == 405  # routing first
    await fake.configure(forbidden=True)
    denied = {"message": "This action is unauthorized."}
    for resp in (
        await client.post("/v1/customers", json=signup("c")),
        await client.get("/v1/customers/c"),
    ):
        assert (resp.status_code, resp.json()) == (403, denied)
    assert fake.customers() == []


# ---- sales and the registry ----------------------------------------------------------------------


async def test_strict_sales_need_the_customer(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    early = await client.post("/v1/transactions", json=sale("t-1", customer="cus_s"))
    assert (early.status_code, early.json()) == (400, CUSTOMER_NOT_FOUND)
    await client.post("/v1/customers", json=signup("cus_s", email="s@example.com"))
    assert (await client.post("/v1/transactions", json=sale("t-1", customer="cus_s"))).is_success
    by_email = {"key": "t-2", "customer": {"email": "S@example.com"}, "amount": 3}
    assert (await client.post("/v1/transactions", json=by_email)).status_code == 201
    assert [e["customer_key"] for e in fake.ledger()] == ["cus_s", None]
    assert log_rows(fake, "seq", "resource", "customer_key", "status", "message") == [
        (1, "transaction", "cus_s", 400, "Customer not found"),
        (2, "customer", "cus_s", 201, None),
        (3, "transaction", "cus_s", 201, None),
        (4, "transaction", None, 201, None),
    ]


async def test_lenient_sales_keep_the_old_behaviour(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await fake.configure(customers_must_exist=False)
    assert (await client.post("/v1/transactions", json=sale("t-1", customer="nobody"))).is_success
    fake.set_customers(unknown=["ghost"])
    refused = await client.post("/v1/transactions", json=sale("t-2", customer="ghost"))
    assert refused.json() == CUSTOMER_NOT_FOUND
    # A signup makes an unknown customer known.
    await client.post("/v1/customers", json=signup("ghost"))
    assert fake.config.unknown_customers == set()
    assert (await client.post("/v1/transactions", json=sale("t-2", customer="ghost"))).is_success
    assert [c["key"] for c in fake.customers()] == ["ghost"]


@pytest.mark.parametrize("strict", [True, False])
async def test_create_customer_option_registers(
    fake: FakePartnero, client: httpx.AsyncClient, strict: bool
) -> None:
    await fake.configure(customers_must_exist=strict)
    fake.set_customers(unknown=["cus_o"])
    body = sale("t-o", customer="cus_o") | {"options": {"create_customer": True}}
    body["customer"]["partner"] = {"email": "partner1@example.com"}
    assert (await client.post("/v1/transactions", json=body)).status_code == 201
    [customer] = fake.customers()
    assert (customer["key"], customer["partner"], customer["created_seq"]) == (
        "cus_o",
        "partner_1",
        1,
    )
    assert fake.ledger()[0]["created_seq"] == 1
    assert fake.config.unknown_customers == set()
    assert (await client.get("/v1/customers/cus_o")).status_code == 200


async def test_admin_known_and_unknown(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/customers", json=signup("cus_api", email="api@example.com"))
    await client.get("/v1/test")
    resp = await client.post("/_fake/customers", json={"known": ["cus_hand", "cus_api"]})
    assert resp.json() == {"unknown_customers": [], "customers": ["cus_api", "cus_hand"]}
    assert [(c["key"], c["source"], c["created_seq"], c["partner"]) for c in fake.customers()] == [
        ("cus_api", "api", 1, "partner_1"),
        ("cus_hand", "admin", 2, None),  # after call 2, before call 3
    ]
    assert (await client.get("/v1/customers/cus_hand")).json()["data"]["partner"] is None
    assert (await client.post("/v1/transactions", json=sale("t-h", customer="cus_hand"))).is_success
    # "unknown" takes customers out of the registry, by key or by email.
    resp = await client.post("/_fake/customers", json={"unknown": ["cus_hand", "API@example.com"]})
    assert resp.json() == {"unknown_customers": ["API@example.com", "cus_hand"], "customers": []}
    for key in ("cus_hand", "cus_api"):
        refused = await client.post("/v1/transactions", json=sale(f"t-{key}", customer=key))
        assert refused.json() == CUSTOMER_NOT_FOUND
        assert (await client.get(f"/v1/customers/{key}")).status_code == 404
    assert fake.stats()["customers"] == {"entries": 0, "api": 0, "admin": 0}
    bad = await client.post("/_fake/customers", json={"known": "cus_x"})
    assert bad.status_code == 400


async def test_reset_clears_customers(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/customers", json=signup("cus_r"))
    fake.set_customers(known=["cus_admin"])
    assert len(fake.customers()) == 2
    assert (await client.post("/_fake/reset")).json() == {"status": 1}
    assert (await client.get("/_fake/ledger")).json() == {"transactions": [], "customers": []}
    assert fake.config.partners == [PARTNER_1]
    assert (await client.post("/v1/customers", json=signup("cus_r"))).status_code == 201
    assert [c["created_seq"] for c in fake.customers()] == [1]


# ---- faults --------------------------------------------------------------------------------------


async def test_429_5xx_and_outage_are_not_applied(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await fake.configure(rate_429=1.0, retry_after_seconds=2)
    resp = await client.post("/v1/customers", json=signup("cus_f"))
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, "2")
    await fake.configure(rate_429=0.0, fail_5xx_rate=1.0)
    assert (await client.post("/v1/customers", json=signup("cus_f"))).status_code in {500, 502, 503}
    assert (await client.get("/v1/customers/cus_f")).status_code in {500, 502, 503}
    await fake.configure(fail_5xx_rate=0.0, outage="503")
    assert (await client.post("/v1/customers", json=signup("cus_f"))).status_code == 503
    await fake.configure(outage=None)
    assert fake.customers() == []
    assert log_rows(fake, "resource", "key", "fault") == [
        ("customer", "cus_f", "rate_429"),
        ("customer", "cus_f", "fail_5xx"),
        ("customer", "cus_f", "fail_5xx"),
        ("customer", "cus_f", "outage"),
    ]


async def test_drop_before_and_after(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await fake.configure(drop_before_rate=1.0)
    with pytest.raises(httpx.TransportError):
        await client.post("/v1/customers", json=signup("cus_b"))
    assert fake.customers() == []
    await fake.configure(drop_before_rate=0.0, drop_after_rate=1.0)
    with pytest.raises(httpx.TransportError):
        await client.post("/v1/customers", json=signup("cus_b"))
    assert [c["created_seq"] for c in fake.customers()] == [2]
    with pytest.raises(httpx.TransportError):
        await client.post("/v1/customers", json=signup("cus_b"))  # the retry
    assert log_rows(fake, "seq", "key", "status", "would_status", "message") == [
        (1, "cus_b", "dropped_before", None, None),
        (2, "cus_b", "dropped_after", 201, None),
        (3, "cus_b", "dropped_after", 422, "Duplicate key"),
    ]


async def test_hang_after_and_latency(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await fake.configure(hang_after_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/customers", json=signup("cus_h"), timeout=0.3)
    assert [e["status"] for e in fake.requests()] == ["hung_after"]
    assert [c["key"] for c in fake.customers()] == ["cus_h"]
    await fake.configure(hang_after_rate=0.0, latency_ms=20)
    answers = await asyncio.gather(
        *(client.post("/v1/customers", json=signup(f"cus_{i}")) for i in range(5))
    )
    assert [a.status_code for a in answers] == [201] * 5
    assert len(fake.customers()) == 6


@pytest.mark.parametrize("answer", ODD_ANSWERS)
@pytest.mark.parametrize("applied", [False, True])
async def test_odd_answer_to_a_customer_create(
    fake: FakePartnero, client: httpx.AsyncClient, answer: str, applied: bool
) -> None:
    await fake.configure(odd_answers={"cus_odd": {"answer": answer, "applied": applied}})
    check_odd(await client.post("/v1/customers", json=signup("cus_odd")), answer)
    assert [c["key"] for c in fake.customers()] == (["cus_odd"] if applied else [])
    [logged] = fake.requests()
    assert logged["resource"] == "customer"
    check_odd_logged(logged, "cus_odd", answer, 201 if applied else None)
    # Reads are never odd, nor are other customers.
    expected = 200 if applied else 404
    assert (await client.get("/v1/customers/cus_odd")).status_code == expected
    assert (await client.post("/v1/customers", json=signup("cus_real"))).status_code == 201


# ---- the check a chaos test makes ----------------------------------------------------------------


def signups_before_sales(
    requests: list[dict[str, Any]], customers: list[dict[str, Any]]
) -> list[str]:
    """The customers a sale reached before their signup: a transaction create naming the
    customer's key with a seq below the customer's created_seq."""
    return sorted(
        {
            c["key"]
            for c in customers
            for r in requests
            if r["resource"] == "transaction"
            and r["method"] == "POST"
            and r["customer_key"] == c["key"]
            and r["seq"] < c["created_seq"]
        }
    )


async def test_ledger_orders_signups_and_sales(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/customers", json=signup("cus_good"))
    await client.post("/v1/transactions", json=sale("t-good", customer="cus_good"))
    await client.post("/v1/transactions", json=sale("t-late", customer="cus_late"))  # too early
    await client.post("/v1/customers", json=signup("cus_late"))
    await client.post("/v1/transactions", json=sale("t-late", customer="cus_late"))
    requests = (await client.get("/_fake/requests")).json()["requests"]
    ledger = (await client.get("/_fake/ledger")).json()
    customers = {c["key"]: c["created_seq"] for c in ledger["customers"]}
    assert customers == {"cus_good": 1, "cus_late": 4}
    for entry in ledger["transactions"]:
        assert entry["created_seq"] > customers[entry["customer_key"]]
    assert signups_before_sales(requests, ledger["customers"]) == ["cus_late"]
    refused = [r for r in requests if r["status"] == 400]
    assert [(r["seq"], r["customer_key"], r["message"]) for r in refused] == [
        (3, "cus_late", "Customer not found")
    ]


def test_thread_runner_customers() -> None:
    with FakePartneroThread(FakeConfig(customers_must_exist=True)) as fake:
        fake.set_customers(known=["cus_t"])
        with httpx.Client(base_url=fake.url) as http:
            assert http.post("/v1/transactions", json=sale("t-t", customer="cus_t")).is_success
        [customer] = fake.customers()
        assert (customer["key"], customer["source"], customer["created_seq"]) == (
            "cus_t",
            "admin",
            0,
        )
        assert fake.config.customers_must_exist is True
