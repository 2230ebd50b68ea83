"""The key check (`GET /v1/test`) with a scripted client: what each answer does to the gate,
to Health and to the STATUS= line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from outbox.delivery.context import Context
from outbox.delivery.gate import Gate
from outbox.delivery.health import Health
from outbox.delivery.keycheck import KeyCheck, NotPartneroError
from outbox.domain import Exchange, RequestKind, TransportError
from outbox.service.metrics import Metrics
from outbox.service.settings import Settings, load
from unit.fakes import FakeNotifier

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
URL = "https://api.partnero.com"
AUTH_PAUSE = 30.0
BASE_DELAY = 2.0


def settings() -> Settings:
    raw = {
        "database_url": "postgresql://outbox@localhost/shop",
        "partnero_api_url": URL,
        "auth_pause_seconds": str(AUTH_PAUSE),
        "retry_base_delay_seconds": str(BASE_DELAY),
    }
    return load(raw, environ={}, need_api_key=False)


def ping(code: int | None, body: dict[str, Any] | None = None) -> Exchange:
    if code is None:
        return Exchange(
            RequestKind.PING,
            "GET",
            "/v1/test",
            transport_error=TransportError.NOT_SENT,
            error="ConnectError: connection refused",
        )
    if body is None:
        body = {"status": 1} if code < 300 else {"message": "Unauthenticated."}
    return Exchange(
        RequestKind.PING,
        "GET",
        "/v1/test",
        status_code=code,
        json_body=body,
        message=body.get("message"),
    )


class ScriptedClient:
    base_url = URL

    def __init__(self, *answers: Exchange) -> None:
        self.answers = list(answers)
        self.pings = 0
        self.during: Callable[[], None] | None = None

    async def ping(self) -> Exchange:
        self.pings += 1
        await asyncio.sleep(0)
        if self.during is not None:
            self.during()
        return self.answers.pop(0)


class Rig:
    def __init__(self, *answers: Exchange, verified: bool = False) -> None:
        self.now = NOW
        self.client = ScriptedClient(*answers)
        self.gate = Gate(self.clock, verified=verified)
        self.health = Health(database_ok=True, listening=True)
        self.metrics = Metrics()
        self.notifier = FakeNotifier()
        self.stopping = asyncio.Event()
        ctx = Context(
            self.health,
            self.metrics,
            self.notifier,  # type: ignore[arg-type]
            settings,
            self.clock,
            self.stopping,
        )
        self.key_check = KeyCheck(ctx, client=self.client, gate=self.gate)  # type: ignore[arg-type]

    def clock(self) -> datetime:
        return self.now

    def paused_gauge(self) -> float | None:
        return self.metrics.registry.get_sample_value("outbox_paused")


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def names(logs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in logs]


async def test_ok_opens_the_gate(logs: list[dict[str, Any]]) -> None:
    rig = Rig(ping(200))
    assert rig.gate.paused  # closed until the key check passes

    await rig.key_check.check()

    assert not rig.gate.paused
    assert rig.gate.verified
    assert rig.health.paused is False
    assert rig.health.waiting_for_partnero is None
    assert rig.paused_gauge() == 0
    assert rig.notifier.statuses == [rig.health.status_line()]
    assert "outbox.partnero.ready" in names(logs)
    count = rig.metrics.registry.get_sample_value(
        "outbox_http_attempts_total", {"kind": "ping", "status": "200"}
    )
    assert count == 1


@pytest.mark.parametrize("code", [404, 405, 301])
async def test_not_partnero_before_any_success_stops_start_up(code: int) -> None:
    rig = Rig(ping(code, {"message": "not here"}))

    with pytest.raises(NotPartneroError, match="PARTNERO_API_URL"):
        await rig.key_check.check()

    assert rig.gate.paused


async def test_not_partnero_after_a_success_pauses_refused() -> None:
    rig = Rig(ping(404, {"message": "not here"}), verified=True)

    await rig.key_check.check()

    assert rig.gate.paused and rig.gate.refused
    assert rig.health.paused


async def test_401_pauses_refused(logs: list[dict[str, Any]]) -> None:
    rig = Rig(ping(401))

    await rig.key_check.check()

    assert rig.gate.paused and rig.gate.refused
    assert rig.gate.paused_until == NOW + timedelta(seconds=AUTH_PAUSE)
    assert rig.health.paused is True
    assert rig.paused_gauge() == 1
    assert rig.health.last_error is not None and "HTTP 401" in rig.health.last_error
    assert rig.notifier.statuses[-1].startswith("PAUSED")
    assert "outbox.partnero.auth_failed" in names(logs)


async def test_401_then_ok_restores(logs: list[dict[str, Any]]) -> None:
    rig = Rig(ping(401), ping(200), verified=True)
    await rig.key_check.check()

    await rig.key_check.check()

    assert not rig.gate.paused
    assert rig.health.paused is False
    assert rig.paused_gauge() == 0
    assert "outbox.partnero.auth_restored" in names(logs)


@pytest.mark.parametrize("answer", [ping(503, {"message": "down"}), ping(None), ping(429, {})])
async def test_no_usable_answer_keeps_waiting_unrefused(answer: Exchange) -> None:
    rig = Rig(answer)

    await rig.key_check.check()

    assert rig.gate.paused
    assert not rig.gate.refused
    assert rig.health.paused is False
    assert rig.health.waiting_for_partnero is not None
    assert rig.health.waiting_for_partnero.startswith(f"GET {URL}/v1/test: ")
    assert rig.notifier.statuses[-1].startswith("WAITING FOR PARTNERO")
    assert rig.paused_gauge() == 0


async def test_no_answer_is_asked_again_with_back_off_capped_at_the_auth_pause() -> None:
    rig = Rig(*[ping(503, {"message": "down"})] * 6, ping(200), ping(503, {"message": "down"}))
    waits = []
    for _ in range(6):
        await rig.key_check.check()
        assert rig.gate.paused_until is not None
        waits.append((rig.gate.paused_until - rig.now).total_seconds())
        rig.now = rig.gate.paused_until

    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]

    await rig.key_check.check()  # it answers: the back-off starts anew
    assert not rig.gate.paused
    await rig.key_check.check()
    assert rig.gate.paused_until == rig.now + timedelta(seconds=BASE_DELAY)


async def test_a_key_changed_during_the_check_is_checked_at_once(
    logs: list[dict[str, Any]],
) -> None:
    rig = Rig(ping(401))

    def reload_brings_a_new_key() -> None:
        rig.key_check.key_version += 1

    rig.client.during = reload_brings_a_new_key

    await rig.key_check.check()

    assert rig.gate.paused_until == NOW  # due at once: the new key is checked next
    assert rig.health.paused is False  # the old key's refusal is not reported
    assert "outbox.partnero.auth_failed" not in names(logs)


async def test_a_key_changed_during_an_unanswered_check_is_not_reported_refused(
    logs: list[dict[str, Any]],
) -> None:
    """Partnero did not answer the old key's check, then does not answer the new key's: it is
    unreachable, not refusing a key."""
    rig = Rig(ping(503, {"message": "down"}), ping(503, {"message": "down"}))

    def reload_brings_a_new_key() -> None:
        rig.key_check.key_version += 1

    rig.client.during = reload_brings_a_new_key
    await rig.key_check.check()
    rig.client.during = None
    await rig.key_check.wait_and_check()

    assert rig.health.paused is False
    assert "outbox.partnero.auth_failed" not in names(logs)
    assert rig.health.waiting_for_partnero is not None
    assert not rig.notifier.statuses[-1].startswith("PAUSED")


async def test_a_key_changed_during_the_check_may_open_the_gate() -> None:
    rig = Rig(ping(200))

    def reload_brings_a_new_key() -> None:
        rig.key_check.key_version += 1

    rig.client.during = reload_brings_a_new_key

    await rig.key_check.check()

    assert not rig.gate.paused


async def test_wait_and_check_announces_a_refusal_the_executor_saw(
    logs: list[dict[str, Any]],
) -> None:
    rig = Rig(ping(200), verified=True)
    rig.gate.pause(NOW, "POST /v1/transactions: HTTP 401 [check PARTNERO_API_KEY]")

    await rig.key_check.wait_and_check()

    assert names(logs)[:1] == ["outbox.partnero.auth_failed"]
    assert rig.notifier.statuses[0].startswith("PAUSED")
    # The pause was over: the key was asked at once, and it works again.
    assert rig.client.pings == 1
    assert not rig.gate.paused
    assert rig.health.paused is False


async def test_wait_and_check_shows_a_403_whose_check_got_no_answer_as_waiting() -> None:
    rig = Rig(ping(200), verified=True)
    rig.gate.pause(NOW, "HTTP 403 [GET /v1/test: no usable answer]", refused=False)
    rig.stopping.set()  # announce, then do not ask

    await rig.key_check.wait_and_check()

    assert rig.health.paused is False
    assert rig.health.waiting_for_partnero == "HTTP 403 [GET /v1/test: no usable answer]"
    assert rig.notifier.statuses[0].startswith("WAITING FOR PARTNERO")
    assert rig.client.pings == 0
