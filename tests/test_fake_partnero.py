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

from outbox.fake_partnero import (
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

    found = await client.get("/v1/transactions/t-1")
    assert found.status_code == 200
    assert found.json()["data"]["deleted_at"] is None

    deleted = await client.delete("/v1/transactions/t-1")
    assert (deleted.status_code, deleted.json()) == (200, {"status": 1})

    found = await client.get("/v1/transactions/t-1")
    assert found.status_code == 200
    assert found.json()["data"]["deleted_at"] is not None

    again = await client.delete("/v1/transactions/t-1")
    assert (again.status_code, again.json()) == (
        404,
        {"message": "Transaction not found", "status": 0},
    )
    missing = await client.get("/v1/transactions/nope")
    assert missing.status_code == 404

    [entry] = fake.ledger()
    assert entry["key"] == "t-1"
    assert entry["customer_key"] == "cust-1"
    assert entry["amount"] == 10.5
    assert entry["created_seq"] < entry["deleted_seq"]


async def test_delete_with_key_in_body(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    await client.post("/v1/transactions", json=sale("t-body"))
    resp = await client.request("DELETE", "/v1/transactions", json={"key": "t-body"})
    assert resp.status_code == 200
    assert fake.ledger()[0]["deleted_seq"] is not None
    no_key = await client.request("DELETE", "/v1/transactions", json={})
    assert no_key.status_code == 422


async def test_key_with_reserved_characters(client: httpx.AsyncClient) -> None:
    await client.post("/v1/transactions", json=sale("order/42 #a"))
    found = await client.get("/v1/transactions/order%2F42%20%23a")
    assert found.status_code == 200
    assert found.json()["data"]["key"] == "order/42 #a"


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
    assert marked.json() == {"unknown_customers": ["ghost"]}
    resp = await client.post("/v1/transactions", json=sale("t-g", customer="ghost"))
    assert (resp.status_code, resp.json()) == (
        400,
        {"message": "Customer not found", "status": 0},
    )
    assert fake.ledger() == []
    await client.post("/_fake/customers", json={"known": ["ghost"]})
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
    assert (await client.get("/v1/nothing-here")).status_code == 404
    assert (await client.get("/_fake/nothing-here")).status_code == 404
    wrong_method = await client.put("/v1/transactions/t-1")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "GET, DELETE"
    assert (await client.get("/v1/transactions")).status_code == 405
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
        # Admin endpoints need no key.
        assert (await anonymous.get("/_fake/ledger")).json() == {"transactions": []}
    assert fake.ledger() == []


async def test_api_key_is_never_shown(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    shown = await client.get("/_fake/config")
    assert API_KEY not in shown.text
    assert shown.json()["api_key"] == "***"
    assert API_KEY not in repr(fake.config)
    await client.get("/v1/test")
    assert API_KEY not in (await client.get("/_fake/requests")).text


async def test_config_endpoint_validates(fake: FakePartnero, client: httpx.AsyncClient) -> None:
    for bad in ({"bogus": 1}, {"outage": "sometimes"}, {"rate_429": 2}, {"dedupe": "yes"}):
        resp = await client.post("/_fake/config", json=bad)
        assert resp.status_code == 400, bad
    ok = await client.post("/_fake/config", json={"dedupe": False, "latency_ms": 1})
    assert ok.status_code == 200
    assert (fake.config.dedupe, fake.config.latency_ms) == (False, 1.0)
    with pytest.raises(ValueError, match="fail_5xx_rate"):
        FakeConfig(fail_5xx_rate=1.5)


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
            return [(await http.get("/v1/test")).status_code for _ in range(20)]

    first, second = await run(), await run()
    assert first == second
    assert 200 in first
    assert set(first) - {200}


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
    assert (await client.get("/v1/transactions/t-drop")).status_code == 200


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
    paths = [f"/v1/transactions/k-{i}" for i in range(50)]
    payload = b"".join(_get(p) for p in paths)  # all 50 pipelined in one write
    answers = await asyncio.to_thread(_raw_exchange, fake.port, payload, 50)
    assert len(answers) == 50
    assert all(a.startswith(b"HTTP/1.1 404 ") for a in answers)
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
    assert runner.invoke(fake_partnero_command, ["--api-key", "x"]).exit_code == 2


def test_command_serves_until_sigterm() -> None:
    env = dict(os.environ, FAKE_KEY_FOR_TEST=API_KEY)
    code = "from outbox.fake_partnero import fake_partnero_command; fake_partnero_command()"
    args = ["--port", "0", "--api-key-env", "FAKE_KEY_FOR_TEST", "--no-dedupe", "--seed", "1"]
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
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert API_KEY not in line + out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
