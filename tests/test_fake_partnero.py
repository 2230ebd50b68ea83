"""The fake Partnero server, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from outbox.dev.fake_partnero import (
    ODD_ANSWERS,
    FakeConfig,
    FakePartnero,
    FakePartneroThread,
    fake_partnero_command,
)

API_KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def sale(key: str, customer: str = "cust-1", amount: float = 10.5) -> dict[str, Any]:
    return {
        "key": key,
        "customer": {"key": customer},
        "amount": amount,
        "amount_units": "EUR",
        "action": "sale",
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakePartnero]:
    server = FakePartnero(FakeConfig(api_key=API_KEY, seed=7))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(fake: FakePartnero) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH, timeout=10) as http:
        yield http


async def lookup(client: httpx.AsyncClient, key: str, **params: Any) -> list[dict[str, Any]]:
    """The rows of a `GET /v1/transactions?key=...` list answer whose key is exactly `key`."""
    resp = await client.get("/v1/transactions", params={"key": key, **params})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == 1
    return [row for row in resp.json()["data"] if row["key"] == key]


def route_404(path: str) -> dict[str, str]:
    return {"message": f"The route {path} could not be found."}


# ---- the API -------------------------------------------------------------------------------------


async def test_create_lookup_delete(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/transactions", json=sale("t-1"))
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == 1
    data = body["data"]
    assert (data["key"], data["action"], data["amount"], data["amount_units"]) == (
        "t-1",
        "sale",
        10.5,
        "EUR",
    )
    assert data["customer"] == "cust-1"
    assert data["deleted_at"] is None
    assert data["created_at"].endswith("Z")

    [found] = await lookup(client, "t-1")
    assert found["deleted_at"] is None

    deleted = await client.delete("/v1/transactions/t-1")
    assert (deleted.status_code, deleted.json()) == (200, {"status": 1})

    [found] = await lookup(client, "t-1")  # deleted entries are listed too
    assert found["deleted_at"] is not None

    again = await client.delete("/v1/transactions/t-1")
    assert (again.status_code, again.json()) == (
        404,
        {"message": "Transaction not found", "status": 0},
    )
    assert await lookup(client, "nope") == []

    [entry] = fake.ledger()
    assert entry["key"] == "t-1"
    assert entry["customer_key"] == "cust-1"
    assert entry["amount"] == 10.5
    assert entry["created_seq"] < entry["deleted_seq"]


async def test_delete_with_key_in_body(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/transactions", json=sale("t-body"))
    resp = await client.request("DELETE", "/v1/transactions", json={"key": "t-body"})
    assert (resp.status_code, resp.json()) == (200, {"status": 1})
    assert fake.ledger()[0]["deleted_seq"] is not None
    no_key = await client.request("DELETE", "/v1/transactions", json={})
    assert no_key.status_code == 422
    assert "status" not in no_key.json()
    assert no_key.json()["errors"] == {"key": ["The key field is required."]}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/transactions/FV%2F2026%2F11%2F7",
        "/v1/transactions/FV%2f2026%2f11%2f7",
        "/v1/transactions/FV/2026/11/7",
        "/v1/transactions/FV%2F2026%2F11%2F7/",
    ],
)
async def test_key_with_slash_in_a_path_reaches_no_route(
    fake: FakePartnero, client: httpx.AsyncClient, path: str
) -> None:
    """Laravel decodes the path before routing: `%2F` makes extra segments, a route-level 404
    (not Partnero's "Transaction not found"), and nothing is deleted."""
    assert (await client.post("/v1/transactions", json=sale("FV/2026/11/7"))).status_code == 201
    for method in ("DELETE", "GET"):
        resp = await client.request(method, path)
        assert (resp.status_code, resp.json()) == (404, route_404(path.strip("/"))), method
    assert fake.ledger()[0]["deleted_seq"] is None
    assert [e["key"] for e in fake.requests()] == ["FV/2026/11/7", None, None]
    # The body form and the list filter are the ways that work.
    [found] = await lookup(client, "FV/2026/11/7")
    assert found["deleted_at"] is None
    resp = await client.request("DELETE", "/v1/transactions", json={"key": "FV/2026/11/7"})
    assert (resp.status_code, resp.json()) == (200, {"status": 1})
    assert fake.ledger()[0]["deleted_seq"] is not None


@pytest.mark.parametrize(
    "key",
    ["FV/2026/11/7", "a?b=c", "x#frag", "100%", "%2F", "two words", "a+b", "ü€ ключ", "../x"],
)
async def test_body_delete_and_list_take_any_key(
    fake: FakePartnero, client: httpx.AsyncClient, key: str
) -> None:
    assert (await client.post("/v1/transactions", json=sale(key))).status_code == 201
    assert len(await lookup(client, key)) == 1
    resp = await client.request("DELETE", "/v1/transactions", json={"key": key})
    assert (resp.status_code, resp.json()) == (200, {"status": 1})
    [entry] = fake.ledger()
    assert (entry["key"], entry["deleted_seq"] is not None) == (key, True)
    assert [e["key"] for e in fake.requests()] == [key, key, key]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/v1/transactions/a%20b", "a b"),
        ("/v1/transactions/a+b", "a+b"),  # rawurldecode: "+" stays "+" in a path
        ("/v1/transactions/100%25", "100%"),
        ("/v1/transactions/100%", "100%"),  # a bad escape is kept as it is
        ("/v1/transactions/%C3%BC%E2%82%AC", "ü€"),
        ("/v1/transactions/a%3Fb%23c", "a?b#c"),
        ("/v1/transactions/t-1/", "t-1"),  # trailing slashes are trimmed before routing
    ],
)
async def test_path_delete_decodes_one_segment(
    fake: FakePartnero, client: httpx.AsyncClient, path: str, key: str
) -> None:
    await client.post("/v1/transactions", json=sale(key))
    resp = await client.delete(path)
    assert (resp.status_code, resp.json()) == (200, {"status": 1})
    assert fake.ledger()[0]["deleted_seq"] is not None
    assert fake.requests()[-1]["key"] == key


async def test_no_lookup_by_path(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/transactions", json=sale("t-1"))
    resp = await client.get("/v1/transactions/t-1")
    assert resp.status_code == 405
    assert resp.json() == {
        "message": "The GET method is not supported for route v1/transactions/t-1. "
        "Supported methods: DELETE."
    }
    assert resp.headers["Allow"] == "DELETE"
    assert fake.requests()[-1]["key"] == "t-1"


# ---- the list ------------------------------------------------------------------------------------


async def test_list_filter_is_a_case_insensitive_substring(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    for key in ("INV-100", "inv-1001", "x-Inv-10-y", "other", "inv-2"):
        await client.post("/v1/transactions", json=sale(key))
    await client.delete("/v1/transactions/inv-1001")
    resp = await client.get("/v1/transactions", params={"key": "inv-10"})
    rows = resp.json()["data"]
    assert [(r["key"], r["deleted_at"] is not None) for r in rows] == [
        ("INV-100", False),
        ("inv-1001", True),
        ("x-Inv-10-y", False),
    ]
    assert resp.json()["meta"]["total"] == 3
    assert fake.requests()[-1]["key"] == "inv-10"
    # Only an exact key is "found"; a prefix of another key is not.
    assert await lookup(client, "inv-10") == []
    everything = (await client.get("/v1/transactions")).json()
    assert [r["key"] for r in everything["data"]] == [
        "INV-100",
        "inv-1001",
        "x-Inv-10-y",
        "other",
        "inv-2",
    ]
    assert fake.requests()[-1]["key"] is None
    assert (await client.get("/v1/transactions?key=")).json()["meta"]["total"] == 5


async def test_list_query_is_decoded_like_php(client: httpx.AsyncClient) -> None:
    for key in ("a b", "a+b"):
        await client.post("/v1/transactions", json=sale(key))

    async def keys(query: str) -> list[str]:
        resp = await client.get(f"/v1/transactions?{query}")
        return [r["key"] for r in resp.json()["data"]]

    assert await keys("key=a+b") == ["a b"]
    assert await keys("key=a%20b") == ["a b"]
    assert await keys("key=a%2Bb") == ["a+b"]
    assert await keys("key=zzz&key=a%2Bb") == ["a+b"]  # the last one wins


async def test_list_paginates(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    for i in range(7):
        await client.post("/v1/transactions", json=sale(f"k {i}/x"))
    base = f"{fake.url}/v1/transactions"

    def url(page: int) -> str:
        return f"{base}?key=k%20&limit=3&page={page}"

    first = await client.get("/v1/transactions", params={"key": "k ", "limit": 3})
    body = first.json()
    assert [r["key"] for r in body["data"]] == ["k 0/x", "k 1/x", "k 2/x"]
    assert body["links"] == {"first": url(1), "last": url(3), "prev": None, "next": url(2)}
    assert body["meta"] == {
        "current_page": 1,
        "from": 1,
        "last_page": 3,
        "path": base,
        "per_page": 3,
        "to": 3,
        "total": 7,
    }
    assert body["status"] == 1
    second = (await client.get(body["links"]["next"])).json()  # absolute and followable
    assert [r["key"] for r in second["data"]] == ["k 3/x", "k 4/x", "k 5/x"]
    assert (second["links"]["prev"], second["links"]["next"]) == (url(1), url(3))
    assert (second["meta"]["from"], second["meta"]["to"]) == (4, 6)
    last = (await client.get(second["links"]["next"])).json()
    assert [r["key"] for r in last["data"]] == ["k 6/x"]
    assert (last["links"]["prev"], last["links"]["next"]) == (url(2), None)
    assert (last["meta"]["current_page"], last["meta"]["from"], last["meta"]["to"]) == (3, 7, 7)
    back = (await client.get(last["links"]["prev"])).json()
    assert back["meta"]["current_page"] == 2
    beyond = (await client.get(url(9))).json()
    assert beyond["data"] == []
    assert (beyond["meta"]["from"], beyond["meta"]["to"], beyond["meta"]["total"]) == (
        None,
        None,
        7,
    )
    assert (beyond["links"]["next"], beyond["links"]["prev"]) == (None, url(8))


async def test_list_defaults_and_empty(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    empty = (await client.get("/v1/transactions", params={"key": "none"})).json()
    assert empty["data"] == []
    assert empty["links"]["next"] is None
    assert empty["links"]["last"] == f"{fake.url}/v1/transactions?key=none&limit=15&page=1"
    assert empty["meta"] | {"path": None} == {
        "current_page": 1,
        "from": None,
        "last_page": 1,
        "path": None,
        "per_page": 15,
        "to": None,
        "total": 0,
    }
    for i in range(16):
        await client.post("/v1/transactions", json=sale(f"t-{i}"))
    body = (await client.get("/v1/transactions")).json()
    assert len(body["data"]) == 15
    assert body["meta"]["last_page"] == 2
    assert body["links"]["next"] == f"{fake.url}/v1/transactions?limit=15&page=2"
    assert len((await client.get("/v1/transactions?limit=250")).json()["data"]) == 16


@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("limit=0", {"limit": ["The limit field must be at least 1."]}),
        ("limit=251", {"limit": ["The limit field must not be greater than 250."]}),
        ("limit=abc", {"limit": ["The limit field must be an integer."]}),
        ("limit=1.5", {"limit": ["The limit field must be an integer."]}),
        ("page=0", {"page": ["The page field must be at least 1."]}),
        (
            "page=-1&limit=x",
            {"page": ["The page field must be at least 1."]}
            | {"limit": ["The limit field must be an integer."]},
        ),
    ],
)
async def test_list_validates_limit_and_page(
    client: httpx.AsyncClient, query: str, errors: dict[str, list[str]]
) -> None:
    resp = await client.get(f"/v1/transactions?{query}")
    assert resp.status_code == 422
    assert resp.json() == {"message": "The given data was invalid.", "errors": errors}


async def test_reward_without_amount_is_accepted(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/transactions", json={"key": "r-1", "customer": {"email": "a@b.c"}, "reward": 5}
    )
    assert resp.status_code == 201
    assert resp.json()["data"]["customer"] == "a@b.c"


@pytest.mark.parametrize(("dedupe", "entries"), [(True, 1), (False, 2)])
async def test_dedupe_on_and_off(
    fake: FakePartnero, client: httpx.AsyncClient, dedupe: bool, entries: int
) -> None:
    await fake.configure(dedupe=dedupe)
    first = await client.post("/v1/transactions", json=sale("t-dup"))
    second = await client.post("/v1/transactions", json=sale("t-dup"))
    assert first.status_code == 201
    if dedupe:
        assert (second.status_code, second.json()) == (
            400,
            {"message": "Duplicate key", "status": 0},
        )
    else:
        assert second.status_code == 201
    assert [e["key"] for e in fake.ledger()] == ["t-dup"] * entries
    # A delete reverses every live entry with the key.
    assert (await client.delete("/v1/transactions/t-dup")).status_code == 200
    assert all(e["deleted_seq"] is not None for e in fake.ledger())


async def test_deleted_key_still_counts_as_duplicate(client: httpx.AsyncClient) -> None:
    await client.post("/v1/transactions", json=sale("t-del"))
    await client.delete("/v1/transactions/t-del")
    resp = await client.post("/v1/transactions", json=sale("t-del"))
    assert resp.json() == {"message": "Duplicate key", "status": 0}


async def test_unknown_customer_then_known(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    marked = await client.post("/_fake/customers", json={"unknown": ["ghost"]})
    assert marked.json() == {"unknown_customers": ["ghost"], "customers": []}
    resp = await client.post("/v1/transactions", json=sale("t-g", customer="ghost"))
    assert (resp.status_code, resp.json()) == (
        400,
        {"message": "Customer not found", "status": 0},
    )
    assert fake.ledger() == []
    known = await client.post("/_fake/customers", json={"known": ["ghost"]})
    assert known.json() == {"unknown_customers": [], "customers": ["ghost"]}
    resp = await client.post("/v1/transactions", json=sale("t-g", customer="ghost"))
    assert resp.status_code == 201


async def test_validation_errors(client: httpx.AsyncClient) -> None:
    no_amount = await client.post("/v1/transactions", json={"customer": {"key": "c"}, "key": "k"})
    assert no_amount.status_code == 422
    assert no_amount.json() == {
        "message": "The given data was invalid.",
        "errors": {"amount": ["The amount field is required."]},
    }
    no_customer = await client.post("/v1/transactions", json={"amount": 1})
    assert no_customer.status_code == 422
    assert set(no_customer.json()["errors"]) == {"customer.key", "customer.email"}
    bad_amount = await client.post("/v1/transactions", json=sale("k") | {"amount": "ten"})
    assert bad_amount.json()["errors"] == {"amount": ["The amount field must be a number."]}
    not_object = await client.post("/v1/transactions", json=[1, 2])
    assert not_object.status_code == 422


async def test_malformed_requests(client: httpx.AsyncClient) -> None:
    bad_json = await client.post(
        "/v1/transactions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (bad_json.status_code, bad_json.json()) == (400, {"message": "Malformed JSON"})
    nothing = await client.get("/v1/nothing-here")
    assert (nothing.status_code, nothing.json()) == (404, route_404("v1/nothing-here"))
    assert (await client.get("/_fake/nothing-here")).status_code == 404
    wrong_method = await client.put("/v1/transactions/t-1")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "DELETE"
    wrong_method = await client.put("/v1/transactions")
    assert wrong_method.json() == {
        "message": "The PUT method is not supported for route v1/transactions. "
        "Supported methods: GET, POST, DELETE."
    }
    assert wrong_method.headers["Allow"] == "GET, POST, DELETE"
    assert (await client.post("/v1/test")).headers["Allow"] == "GET"
    assert (await client.delete("/_fake/ledger")).status_code == 405


async def test_auth(fake: FakePartnero) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            resp = await anonymous.get("/v1/test", headers=headers)
            assert (resp.status_code, resp.json()) == (401, {"message": "Unauthenticated."})
            resp = await anonymous.post("/v1/transactions", json=sale("t-a"), headers=headers)
            assert resp.status_code == 401
        ok = await anonymous.get("/v1/test", headers=AUTH)
        assert (ok.status_code, ok.json()) == (200, {"status": 1})
        # Routing comes before auth, as in Laravel.
        assert (await anonymous.get("/v1/nothing")).status_code == 404
        assert (await anonymous.get("/v1/transactions/t-a")).status_code == 405
        assert (await anonymous.get("/v1/transactions")).status_code == 401
        # Admin endpoints need no key.
        assert (await anonymous.get("/_fake/ledger")).json() == {
            "transactions": [],
            "customers": [],
        }
    assert fake.ledger() == []


async def test_api_key_is_never_shown(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    shown = await client.get("/_fake/config")
    assert API_KEY not in shown.text
    assert shown.json()["api_key"] == "***"
    assert API_KEY not in repr(fake.config)
    await client.get("/v1/test")
    assert API_KEY not in (await client.get("/_fake/requests")).text


async def test_config_endpoint_validates(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    bad_changes: list[dict[str, Any]] = [
        {"bogus": 1},
        {"outage": "sometimes"},
        {"rate_429": 2},
        {"dedupe": "yes"},
        {"forbidden": 1},
        {"odd_answers": []},
        {"odd_answers": {"k": "status_0"}},
        {"odd_answers": {"k": {"answer": "teapot"}}},
        {"odd_answers": {"k": {}}},
        {"odd_answers": {"k": {"answer": "status_0", "times": 0}}},
        {"odd_answers": {"k": {"answer": "status_0", "times": -1}}},
        {"odd_answers": {"k": {"answer": "status_0", "times": 1.5}}},
        {"odd_answers": {"k": {"answer": "status_0", "times": True}}},
        {"odd_answers": {"k": {"answer": "status_0", "applied": "yes"}}},
        {"odd_answers": {"k": {"answer": "status_0", "when": "always"}}},
    ]
    for bad in bad_changes:
        resp = await client.post("/_fake/config", json=bad)
        assert resp.status_code == 400, bad
        assert "message" in resp.json()
    assert fake.config.odd_answers == {}
    assert fake.config.forbidden is False
    ok = await client.post("/_fake/config", json={"dedupe": False, "latency_ms": 1})
    assert ok.status_code == 200
    assert (fake.config.dedupe, fake.config.latency_ms) == (False, 1.0)
    with pytest.raises(ValueError, match="fail_5xx_rate"):
        FakeConfig(fail_5xx_rate=1.5)
    with pytest.raises(ValueError, match="answer must be one of"):
        FakeConfig(odd_answers={"k": {"answer": "nope"}})


async def test_config_odd_answers_and_forbidden_round_trip(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    odd = {"a": {"answer": "html_200"}, "b": {"answer": "status_0", "applied": True, "times": 2}}
    resp = await client.post("/_fake/config", json={"odd_answers": odd, "forbidden": True})
    assert resp.status_code == 200
    normalised = {
        "a": {"answer": "html_200", "applied": False, "times": None},
        "b": {"answer": "status_0", "applied": True, "times": 2},
    }
    assert resp.json()["odd_answers"] == normalised
    assert resp.json()["forbidden"] is True
    assert (await client.get("/_fake/config")).json()["odd_answers"] == normalised
    odd["a"]["answer"] = "forbidden"  # the fake keeps its own copy
    assert fake.config.odd_answers == normalised
    snapshot = fake.config.copy()
    snapshot.odd_answers["b"]["times"] = 9
    del snapshot.odd_answers["a"]
    assert fake.config.odd_answers == normalised
    await fake.configure(odd_answers={}, forbidden=False)
    assert fake.config.public()["odd_answers"] == {}


# ---- faults --------------------------------------------------------------------------------------


async def test_429_carries_retry_after(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/_fake/config", json={"rate_429": 1.0, "retry_after_seconds": 3})
    resp = await client.post("/v1/transactions", json=sale("t-429"))
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "3"
    assert fake.ledger() == []
    assert fake.requests()[-1]["fault"] == "rate_429"


async def test_5xx_is_not_applied(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await fake.configure(fail_5xx_rate=1.0)
    statuses = {
        (await client.post("/v1/transactions", json=sale(f"t-{i}"))).status_code for i in range(30)
    }
    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1
    assert fake.ledger() == []


async def test_faults_are_reproducible_with_a_seed(fake: FakePartnero) -> None:
    async def run() -> list[int]:
        fake.reset()
        await fake.configure(fail_5xx_rate=0.5, seed=42)
        async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as http:
            return [(await http.get("/v1/transactions")).status_code for _ in range(20)]

    first, second = await run(), await run()
    assert first == second
    assert 200 in first
    assert set(first) - {200}


async def test_the_key_check_is_never_randomly_faulted(fake: FakePartnero) -> None:
    """GET /v1/test fails only in an outage or with `forbidden`: a test that faults every
    transaction call still gets past the daemon's start-up check."""
    await fake.configure(fail_5xx_rate=1.0, drop_before_rate=1.0, rate_429=1.0)
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as http:
        assert [(await http.get("/v1/test")).status_code for _ in range(5)] == [200] * 5
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/v1/transactions")


async def test_drop_before_is_not_applied(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await fake.configure(drop_before_rate=1.0)
    with pytest.raises(httpx.TransportError):
        await client.post("/v1/transactions", json=sale("t-drop"))
    assert fake.ledger() == []
    [logged] = fake.requests()
    assert (logged["status"], logged["key"]) == ("dropped_before", "t-drop")
    await fake.configure(drop_before_rate=0.0)
    assert (await client.post("/v1/transactions", json=sale("t-drop"))).status_code == 201


async def test_drop_after_is_applied(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await fake.configure(drop_after_rate=1.0)
    with pytest.raises(httpx.TransportError):
        await client.post("/v1/transactions", json=sale("t-drop"))
    assert [e["key"] for e in fake.ledger()] == ["t-drop"]
    [logged] = fake.requests()
    assert (logged["status"], logged["would_status"]) == ("dropped_after", 201)
    await fake.configure(drop_after_rate=0.0)
    # A client that looks the key up finds the create it never heard about.
    assert len(await lookup(client, "t-drop")) == 1


async def test_hang_after_is_applied_and_never_answered(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await fake.configure(hang_after_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/transactions", json=sale("t-hang"), timeout=0.3)
    assert [e["key"] for e in fake.ledger()] == ["t-hang"]
    [logged] = fake.requests()
    assert (logged["status"], logged["would_status"]) == ("hung_after", 201)


async def test_outage_refuse_and_recovery(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/test")).status_code == 200  # a pooled keep-alive connection
    await fake.configure(outage="refuse")
    with pytest.raises(httpx.ConnectError):
        await client.get("/v1/test")
    with pytest.raises(httpx.ConnectError):
        await client.get("/_fake/stats")
    await fake.configure(outage=None)
    assert (await client.get("/v1/test")).status_code == 200


async def test_outage_refuse_over_http_clears_itself(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    resp = await client.post("/_fake/config", json={"outage": "refuse", "outage_for_seconds": 0.2})
    assert resp.status_code == 200
    assert resp.json()["outage"] == "refuse"
    with pytest.raises(httpx.ConnectError):
        await client.get("/v1/test")
    await fake.wait_for(lambda: fake.config.outage is None, timeout=5)
    assert (await client.get("/v1/test")).status_code == 200


async def test_outage_503_and_recovery(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/_fake/config", json={"outage": "503"})
    resp = await client.post("/v1/transactions", json=sale("t-503"))
    assert resp.status_code == 503
    assert (await client.get("/_fake/stats")).status_code == 200  # admin is never faulted
    assert fake.ledger() == []
    await client.post("/_fake/config", json={"outage": None})
    assert (await client.post("/v1/transactions", json=sale("t-503"))).status_code == 201


async def test_outage_timeout_holds_calls_until_cleared(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await fake.configure(outage="timeout")
    call = asyncio.create_task(client.post("/v1/transactions", json=sale("t-held")))
    await fake.wait_for(lambda: any(e["status"] == "pending" for e in fake.requests()))
    assert not call.done()
    stats = await client.get("/_fake/stats")  # admin works on another connection meanwhile
    assert stats.json()["by_status"] == {"pending": 1}
    await client.post("/_fake/config", json={"outage": None})
    with pytest.raises(httpx.TransportError):
        await call
    assert fake.ledger() == []
    assert [e["status"] for e in fake.requests()] == ["timeout"]
    assert (await client.post("/v1/transactions", json=sale("t-held"))).status_code == 201


async def test_latency_delays_but_answers(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await fake.configure(latency_ms=20)
    answers = await asyncio.gather(
        *(client.post("/v1/transactions", json=sale(f"t-{i}")) for i in range(10))
    )
    assert [a.status_code for a in answers] == [201] * 10
    assert len(fake.ledger()) == 10


# ---- odd answers and forbidden ------------------------------------------------------------------


ODD_EXPECTED: dict[str, tuple[int, str, bytes | None]] = {
    # answer: (status, content type prefix, exact body or None when checked below)
    "status_0": (200, "application/json", b'{"status":0}'),
    "html_200": (200, "text/html", None),
    "empty_200": (200, "application/json", b""),
    "route_404": (404, "application/json", None),
    "html_404": (404, "text/html", None),
    "html_502": (502, "text/html", None),
    "bad_request": (400, "application/json", b'{"message":"Duplicate customer key","status":0}'),
    "forbidden": (403, "application/json", b'{"message":"This action is unauthorized."}'),
}


def test_every_odd_answer_is_tested() -> None:
    assert set(ODD_EXPECTED) == set(ODD_ANSWERS)


def check_odd(resp: httpx.Response, answer: str) -> None:
    status, content_type, body = ODD_EXPECTED[answer]
    assert resp.status_code == status
    assert resp.headers["Content-Type"].startswith(content_type)
    if body is not None:
        assert resp.content == body
    elif answer == "route_404":
        path = resp.request.url.raw_path.decode().partition("?")[0].strip("/")
        assert resp.json() == route_404(path)
    else:
        assert resp.content.lstrip().startswith((b"<html", b"<!DOCTYPE html"))
        if answer != "html_200":
            assert str(status).encode() in resp.content


def check_odd_logged(logged: dict[str, Any], key: str, answer: str, would: int | None) -> None:
    """`logged`, a request log entry of a call naming `key`, got the odd answer `answer`, after
    applying the call (with the answer `would`) or not (None)."""
    assert (logged["key"], logged["fault"], logged["status"]) == (
        key,
        f"odd:{answer}",
        ODD_EXPECTED[answer][0],
    )
    assert logged.get("would_status") == would


@pytest.mark.parametrize("answer", ODD_ANSWERS)
@pytest.mark.parametrize("applied", [False, True])
async def test_odd_answer_to_a_create(
    fake: FakePartnero, client: httpx.AsyncClient, answer: str, applied: bool
) -> None:
    await fake.configure(odd_answers={"t-odd": {"answer": answer, "applied": applied}})
    check_odd(await client.post("/v1/transactions", json=sale("t-odd")), answer)
    assert [e["key"] for e in fake.ledger()] == (["t-odd"] if applied else [])
    [logged] = fake.requests()
    check_odd_logged(logged, "t-odd", answer, 201 if applied else None)
    # Other keys get real answers; times=None keeps the odd answer for good.
    assert (await client.post("/v1/transactions", json=sale("t-real"))).status_code == 201
    check_odd(await client.post("/v1/transactions", json=sale("t-odd")), answer)
    assert fake.config.odd_answers["t-odd"]["times"] is None


@pytest.mark.parametrize("answer", ODD_ANSWERS)
@pytest.mark.parametrize("applied", [False, True])
@pytest.mark.parametrize("form", ["body", "path"])
async def test_odd_answer_to_a_delete(
    fake: FakePartnero, client: httpx.AsyncClient, answer: str, applied: bool, form: str
) -> None:
    await client.post("/v1/transactions", json=sale("t odd"))
    await fake.configure(odd_answers={"t odd": {"answer": answer, "applied": applied}})
    if form == "body":
        resp = await client.request("DELETE", "/v1/transactions", json={"key": "t odd"})
    else:
        resp = await client.delete("/v1/transactions/t%20odd")
    check_odd(resp, answer)
    assert (fake.ledger()[0]["deleted_seq"] is not None) is applied
    logged = fake.requests()[-1]
    assert logged["method"] == "DELETE"
    check_odd_logged(logged, "t odd", answer, 200 if applied else None)


async def test_odd_answer_runs_out(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post(
        "/_fake/config",
        json={"odd_answers": {"t-1": {"answer": "html_502", "times": 2}}},
    )
    first = await client.post("/v1/transactions", json=sale("t-1"))
    assert first.status_code == 502
    assert fake.config.odd_answers["t-1"]["times"] == 1
    second = await client.post("/v1/transactions", json=sale("t-1"))
    assert second.status_code == 502
    assert fake.config.odd_answers == {}
    third = await client.post("/v1/transactions", json=sale("t-1"))
    assert third.status_code == 201
    assert [e["fault"] for e in fake.requests()] == ["odd:html_502", "odd:html_502", None]
    assert len(fake.ledger()) == 1


async def test_odd_answers_leave_lookups_and_key_checks_alone(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/transactions", json=sale("t-1"))
    await fake.configure(odd_answers={"t-1": {"answer": "status_0", "times": 1}})
    assert len(await lookup(client, "t-1")) == 1
    assert (await client.get("/v1/test")).json() == {"status": 1}
    assert fake.config.odd_answers["t-1"]["times"] == 1  # not used up
    # A route-level 404 or an unauthorised call never reaches the odd answer either.
    assert (await client.delete("/v1/transactions/t-1/x")).status_code == 404
    resp = await client.delete("/v1/transactions/t-1", headers={"Authorization": "Bearer no"})
    assert resp.status_code == 401
    assert fake.config.odd_answers["t-1"]["times"] == 1


async def test_forbidden(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/transactions", json=sale("t-1"))
    await client.post("/_fake/config", json={"forbidden": True})
    denied = {"message": "This action is unauthorized."}
    for method, path, body in (
        ("GET", "/v1/test", None),
        ("GET", "/v1/transactions?key=t-1", None),
        ("POST", "/v1/transactions", sale("t-2")),
        ("DELETE", "/v1/transactions", {"key": "t-1"}),
        ("DELETE", "/v1/transactions/t-1", None),
    ):
        resp = await client.request(method, path, json=body)
        assert (resp.status_code, resp.json()) == (403, denied), (method, path)
    [entry] = fake.ledger()
    assert entry["deleted_seq"] is None
    # A bad key is still 401, a missing route still 404.
    async with httpx.AsyncClient(base_url=fake.url) as anonymous:
        assert (await anonymous.get("/v1/test")).status_code == 401
    assert (await client.get("/v1/nothing")).status_code == 404
    await fake.configure(forbidden=False)
    assert (await client.get("/v1/test")).status_code == 200


# ---- the request log -----------------------------------------------------------------------------


async def test_request_log_orders_delete_after_create(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/transactions", json=sale("t-1"))
    await client.post("/v1/transactions", json=sale("t-2"))
    await client.delete("/v1/transactions/t-1")
    log = (await client.get("/_fake/requests")).json()["requests"]
    assert [(e["seq"], e["method"], e["key"], e["status"]) for e in log] == [
        (1, "POST", "t-1", 201),
        (2, "POST", "t-2", 201),
        (3, "DELETE", "t-1", 200),
    ]
    ledger = (await client.get("/_fake/ledger")).json()["transactions"]
    assert [(e["seq"], e["key"], e["created_seq"], e["deleted_seq"]) for e in ledger] == [
        (1, "t-1", 1, 3),
        (2, "t-2", 2, None),
    ]
    stats = (await client.get("/_fake/stats")).json()
    assert stats["by_method_status"] == {"POST 201": 2, "DELETE 200": 1}
    assert stats["ledger"] == {"entries": 2, "alive": 1, "deleted": 1}
    await client.post("/_fake/reset")
    assert fake.ledger() == []
    assert fake.requests() == []


# ---- HTTP/1.1 ------------------------------------------------------------------------------------


def _raw_exchange(port: int, payload: bytes, responses: int) -> list[bytes]:
    """Send raw bytes on one connection and read `responses` answers (Content-Length framed)."""
    answers: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        buf = b""
        while len(answers) < responses:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return answers
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            while len(buf) < length:
                buf += sock.recv(65536)
            answers.append(head + b"\r\n\r\n" + buf[:length])
            buf = buf[length:]
    return answers


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()


async def test_keep_alive_and_pipelining(fake: FakePartnero) -> None:
    paths = [f"/v1/transactions?key=k-{i}" for i in range(50)]
    payload = b"".join(_get(p) for p in paths)  # all 50 pipelined in one write
    answers = await asyncio.to_thread(_raw_exchange, fake.port, payload, 50)
    assert len(answers) == 50
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    assert [e["key"] for e in fake.requests()] == [f"k-{i}" for i in range(50)]
    assert fake.stats()["connections"]["accepted"] == 1


async def test_bad_http_is_answered_and_closed(fake: FakePartnero) -> None:
    [garbage] = await asyncio.to_thread(_raw_exchange, fake.port, b"NONSENSE\r\n\r\n", 1)
    assert garbage.startswith(b"HTTP/1.1 400 ")
    chunked = (
        b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    [answer] = await asyncio.to_thread(_raw_exchange, fake.port, chunked, 1)
    assert answer.startswith(b"HTTP/1.1 501 ")
    assert b"Connection: close" in answer


def test_thread_runner_many_requests_on_one_connection() -> None:
    with (
        FakePartneroThread(FakeConfig(api_key=API_KEY)) as fake,
        httpx.Client(base_url=fake.url, headers=AUTH) as http,
    ):
        for i in range(2000):
            resp = http.post("/v1/transactions", json=sale(f"t-{i}"))
            assert resp.status_code == 201
        assert len(fake.ledger()) == 2000
        assert fake.stats()["connections"]["accepted"] == 1


def test_thread_runner() -> None:
    with FakePartneroThread(FakeConfig(api_key=API_KEY, dedupe=False)) as fake:
        assert fake.url.startswith("http://127.0.0.1:")
        assert fake.config.dedupe is False

        def send() -> None:
            with httpx.Client(base_url=fake.url, headers=AUTH) as http:
                http.post("/v1/transactions", json=sale("t-bg"))

        sender = threading.Thread(target=send)
        sender.start()
        fake.wait_for(lambda: len(fake.ledger()) == 1)
        sender.join()

        copy = fake.ledger()
        copy[0]["key"] = "changed"
        assert fake.ledger()[0]["key"] == "t-bg"  # a copy, not the fake's own

        snapshot = fake.config
        snapshot.dedupe = True  # changing a snapshot changes nothing ...
        assert fake.config.dedupe is False
        fake.config = snapshot  # ... until it is assigned back
        assert fake.config.dedupe is True
        assert fake.configure(outage="503").outage == "503"
        with httpx.Client(base_url=fake.url, headers=AUTH) as http:
            assert http.get("/v1/test").status_code == 503
        fake.configure(outage=None)
        fake.set_customers(unknown=["ghost"])
        assert fake.config.unknown_customers == {"ghost"}
        with pytest.raises(TimeoutError):
            fake.wait_for(lambda: False, timeout=0.05)
        url = fake.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v1/test")


# ---- command line --------------------------------------------------------------------------------


def test_command_takes_no_key_on_the_command_line() -> None:
    runner = CliRunner()
    help_text = runner.invoke(fake_partnero_command, ["--help"]).output
    assert "--api-key-env" in help_text
    assert "--no-dedupe" in help_text
    assert "--customers-must-exist" in help_text
    assert runner.invoke(fake_partnero_command, ["--api-key", "x"]).exit_code == 2


def test_command_serves_until_sigterm() -> None:
    env = dict(os.environ, FAKE_KEY_FOR_TEST=API_KEY)
    code = "from outbox.dev.fake_partnero import fake_partnero_command; fake_partnero_command()"
    args = ["--port", "0", "--api-key-env", "FAKE_KEY_FOR_TEST", "--no-dedupe", "--seed", "1"]
    args.append("--customers-must-exist")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(
            r"fake-partnero listening on (http://127\.0\.0\.1:\d+) \(dedupe=off\)\n", line
        )
        assert match, line
        with httpx.Client(base_url=match[1]) as http:
            assert http.get("/v1/test", headers=AUTH).status_code == 200
            assert http.get("/v1/test").status_code == 401
            sold = http.post("/v1/transactions", json=sale("t-1", customer="nobody"), headers=AUTH)
            assert sold.json() == {"message": "Customer not found", "status": 0}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert API_KEY not in line + out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---- tampering with the ledger (for outbox reconcile) ------------------------------------------


async def test_tamper_delete_duplicate_amend_revive_purge(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    for key in ("t1", "t10"):
        assert (await client.post("/v1/transactions", json=sale(key))).status_code == 201
    deleted = fake.tamper("delete", "t1")
    assert [(e["key"], e["deleted_seq"]) for e in deleted] == [("t1", 2)]
    assert [r["deleted_at"] is not None for r in await lookup(client, "t1")] == [True]
    revived = fake.tamper("revive", "t1")
    assert (revived[0]["deleted_at"], revived[0]["deleted_seq"]) == (None, None)
    copy = fake.tamper("duplicate", "t1")[0]
    assert (copy["seq"], copy["created_seq"], copy["amount"]) == (3, 3, 10.5)  # after a lookup
    fake.tamper("amend", "t1", amount=12.25, amount_units="USD")
    rows = await lookup(client, "t1")
    assert [(r["amount"], r["amount_units"], r["deleted_at"]) for r in rows] == [
        (12.25, "USD", None),
        (12.25, "USD", None),
    ]
    assert [e["key"] for e in fake.tamper("purge", "t1")] == ["t1", "t1"]
    assert await lookup(client, "t1") == []
    assert [e["key"] for e in fake.ledger()] == ["t10"]  # only the exact key
    created = await client.post("/v1/transactions", json=sale("t2"))
    assert created.status_code == 201
    assert fake.ledger()[-1]["seq"] == 3  # never a seq used before


async def test_tamper_over_http_and_its_refusals(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/transactions", json=sale("t1"))
    resp = await client.post("/_fake/tamper", json={"action": "amend", "key": "t1", "amount": 3})
    assert resp.status_code == 200
    assert [e["amount"] for e in resp.json()["transactions"]] == [3]
    refused = {
        "revive": {"action": "revive", "key": "t1"},  # nothing deleted to revive
        "unknown key": {"action": "delete", "key": "t9"},
    }
    for why, body in refused.items():
        resp = await client.post("/_fake/tamper", json=body)
        assert resp.status_code == 404, why
    for body in (
        {"action": "burn", "key": "t1"},
        {"key": "t1"},
        {"action": "delete"},
        {"action": "amend", "key": "t1"},
        {"action": "amend", "key": "t1", "amount": "ten"},
        [],
    ):
        assert (await client.post("/_fake/tamper", json=body)).status_code == 400, body
    assert (await client.post("/_fake/tamper", content=b"{")).status_code == 400
    assert (await client.get("/_fake/tamper")).status_code == 405
    with pytest.raises(ValueError, match="no transaction to delete"):
        fake.tamper("delete", "t9")


def test_tamper_from_a_thread() -> None:
    with FakePartneroThread(FakeConfig(api_key=API_KEY)) as server:
        httpx.post(f"{server.url}/v1/transactions", json=sale("t1"), headers=AUTH)
        assert [e["key"] for e in server.tamper("duplicate", "t1")] == ["t1"]
        assert [e["deleted_seq"] for e in server.ledger()] == [None, None]


async def test_bulk_ledger_load_appends_entries_as_they_stand(
    fake: FakePartnero, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/transactions", json=sale("t1"))
    bulk = [
        {"key": "b1", "amount": 12.5, "amount_units": "EUR", "customer": "c1", "created_at": 0},
        {"key": "t1"},  # no dedupe: a second entry of t1
    ]
    resp = await client.post("/_fake/ledger/bulk", json={"transactions": bulk})
    assert (resp.status_code, resp.json()) == (200, {"added": 2, "status": 1})
    ledger = fake.ledger()
    assert [(e["seq"], e["key"], e["amount"]) for e in ledger] == [
        (1, "t1", ledger[0]["amount"]),
        (2, "b1", 12.5),
        (3, "t1", None),
    ]
    assert ledger[1]["created_at"] == "1970-01-01T00:00:00.000000Z"
    assert ledger[1]["amount_units"] == "EUR" and ledger[1]["customer_key"] == "c1"
    listed = (await client.get("/v1/transactions", params={"limit": 250})).json()
    assert [t["key"] for t in listed["data"]] == ["t1", "b1", "t1"]
    assert listed["meta"]["total"] == 3
    for body in (
        {"transactions": [{"amount": 1}]},
        {"transactions": [{"key": "x", "amount": "ten"}]},
        {"transactions": {}},
        [],
    ):
        assert (await client.post("/_fake/ledger/bulk", json=body)).status_code == 400, body
    assert len(fake.ledger()) == 3  # all or none
    assert (await client.get("/_fake/ledger/bulk")).status_code == 405
    assert fake.load_ledger([{"key": "b2"}]) == 1
    with pytest.raises(ValueError, match="expected"):
        fake.load_ledger([{"key": 2}])
