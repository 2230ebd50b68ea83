"""The key check: `GET /v1/test` must answer 2xx before the first delivery and after every
pause. A URL that is not Partnero's API stops start-up; a refused key pauses sending; no answer
keeps the daemon asking, sending nothing (docs/design.md, "Reading Partnero's answers")."""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from outbox.delivery.context import Context
from outbox.delivery.gate import Gate
from outbox.delivery.waits import wait_any
from outbox.domain import Exchange, PingVerdict
from outbox.partnero import PartneroClient, api_root
from outbox.policy import backoff_delay, describe, ping_verdict

log = structlog.get_logger("outbox.partnero")

_REFUSED_NOTE = "sending is paused; rows stay pending and no attempts are counted"


class NotPartneroError(Exception):
    """PARTNERO_API_URL does not lead to Partnero's API (GET /v1/test: 404, 405, a redirect)."""


class KeyCheck:
    def __init__(self, ctx: Context, *, client: PartneroClient, gate: Gate) -> None:
        self._ctx = ctx
        self._client = client
        self._gate = gate
        self._unreachable = 0  # key checks in a row that got no usable answer
        self.key_version = 0  # bumped by the daemon when a reload brings a new API key

    async def wait_and_check(self) -> None:
        """While the gate is closed: say why, wait until it may open, then ask again."""
        until = self._gate.paused_until
        assert until is not None
        self._announce(until)
        pause = max(0.0, (until - self._ctx.clock()).total_seconds())
        self._ctx.health.tick(waiting=pause + self._ctx.settings().request_timeout_seconds)
        self._gate.changed.clear()
        await wait_any(self._ctx.stopping, self._gate.changed, timeout=pause)
        if not self._ctx.stopping.is_set():
            await self.check()

    def _announce(self, until: datetime) -> None:
        """The first time a pause the executor started is seen: log it and show it."""
        if self._gate.refused and not self._ctx.health.paused:
            # A call was refused (401, or a 403 that GET /v1/test confirmed).
            log.error(
                "outbox.partnero.auth_failed",
                paused_until=until.isoformat(),
                error=self._gate.pause_detail,
                note=_REFUSED_NOTE,
            )
            self._refused(self._gate.pause_detail)
        elif not self._gate.refused and self._ctx.health.waiting_for_partnero is None:
            # A 403 whose key check got no answer: wait for Partnero, as at start-up.
            log.warning("outbox.partnero.unreachable", error=self._gate.pause_detail)
            self._ctx.health.waiting_for_partnero = self._gate.pause_detail
            self._ctx.health.last_error = self._gate.pause_detail
        self._ctx.notifier.status(self._ctx.health.status_line())

    async def check(self) -> None:
        """One `GET /v1/test`, and what it means for the gate. Raises NotPartneroError when the
        URL is not Partnero's API before any call has worked (a wrong URL never fixes itself)."""
        key_version = self.key_version
        exchange = await self._client.ping()
        self._ctx.metrics.observe_exchange(exchange)
        if self._ctx.stopping.is_set():
            return
        verdict = ping_verdict(exchange)
        if verdict is not PingVerdict.OK and key_version != self.key_version:
            # A reload brought a new key while the old one was being checked: check the new
            # one at once rather than pausing on the old one's answer.
            detail = self._gate.pause_detail or "checking the new API key"
            self._gate.pause(self._ctx.clock(), detail, refused=self._gate.refused)
            return
        if verdict is PingVerdict.OK:
            self._open()
        else:
            self._keep_closed(verdict, exchange)
        self._ctx.notifier.status(self._ctx.health.status_line())

    def _open(self) -> None:
        root = api_root(self._client.base_url)
        event = "outbox.partnero.auth_restored" if self._gate.verified else "outbox.partnero.ready"
        log.info(event, url=root)
        self._unreachable = 0
        self._gate.resume()
        self._ctx.health.paused = False
        self._ctx.health.waiting_for_partnero = None
        self._ctx.metrics.paused.set(0)

    def _keep_closed(self, verdict: PingVerdict, exchange: Exchange) -> None:
        root = api_root(self._client.base_url)
        detail = f"GET {root}/v1/test: {describe(exchange)}"
        if verdict is PingVerdict.NOT_PARTNERO and not self._gate.verified:
            raise NotPartneroError(
                f"invalid setting PARTNERO_API_URL (--partnero-api-url): {root} is not "
                f"Partnero's API ({detail})"
            )
        settings = self._ctx.settings()
        now = self._ctx.clock()
        if verdict is PingVerdict.UNREACHABLE:
            # Keep asking, sooner at first; nothing is sent meanwhile.
            self._unreachable += 1
            wait = min(
                backoff_delay(self._unreachable, settings.retry_policy(), 0.5),
                settings.auth_pause_seconds,
            )
            log.warning("outbox.partnero.unreachable", error=detail, retry_in=round(wait, 2))
            self._ctx.health.waiting_for_partnero = detail
            self._ctx.health.last_error = detail
            self._gate.pause(now + timedelta(seconds=wait), detail, refused=False)
            return
        # Refused (401/403), or (after it had worked) no longer Partnero's API at this URL.
        until = now + timedelta(seconds=settings.auth_pause_seconds)
        log.error(
            "outbox.partnero.auth_failed",
            paused_until=until.isoformat(),
            error=detail,
            note=_REFUSED_NOTE,
        )
        self._refused(detail)
        self._gate.pause(until, detail)

    def _refused(self, detail: str | None) -> None:
        self._ctx.health.paused = True
        self._ctx.health.last_error = detail
        self._ctx.metrics.paused.set(1)
