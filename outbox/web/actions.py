"""Retry and discard, from the page: a preview first (the ops function's dry run: exactly the
rows the action would change), then the confirmed action on exactly the ids previewed, with a
required reason and the signed-in user as the actor, recorded in outbox.operator_actions as the
CLI's actions are. Viewers are refused (403) before anything is read.

A selection by filter is resolved to ids first, with the same function and filters as the row
list (`outbox failed`): failed rows for retry (or skipped ones, status=skipped), failed and
blocked rows for discard; so the confirmation names the ids, and what is confirmed is what was
previewed."""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog
from aiohttp import web
from multidict import MultiMapping

from outbox.ops import commands, model
from outbox.web import forms
from outbox.web.app import STORE, render, signed_in
from outbox.web.auth import User

log = structlog.get_logger("outbox.web")
routes = web.RouteTableDef()

# The most rows one action by filter takes from the page (narrow the filter beyond).
MAX_ROWS = 1000
KINDS = ("retry", "discard")


def _operator(request: web.Request) -> User:
    user = signed_in(request)
    if not user.may_act:
        log.warning("outbox.web.action_refused", user=user.name, path=request.path)
        raise web.HTTPForbidden(text=f"{user.name} may read, not act (role viewer)")
    return user


def _fields(form: MultiMapping[Any]) -> dict[str, str]:
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _id_values(form: MultiMapping[Any]) -> list[str]:
    return [v for v in form.getall("ids", []) if isinstance(v, str)]


async def _selected(request: web.Request, kind: str, form: MultiMapping[Any]) -> tuple[int, ...]:
    """The ids given, or the rows the filter fields select (as the row list shows them)."""
    given = forms.ids(_id_values(form))
    if given:
        return given
    fields = _fields(form)
    filters = forms.filters(fields)
    if not filters.given():  # as the CLI, which asks for --all (status skipped alone too)
        raise forms.FormError(
            "say which rows: tick them, or filter them (outcome, HTTP status, since, key, ...)"
        )
    if kind == "retry" and filters.state is model.ProblemState.BLOCKED:
        raise forms.FormError(
            "status blocked: retry takes failed rows; the rows blocked behind them are woken "
            "with them"
        )
    if kind == "retry" and filters.status is None:
        filters = dataclasses.replace(filters, state=model.ProblemState.FAILED)
    page = await request.app[STORE].failed(filters, limit=MAX_ROWS, page=1)
    if page.total > MAX_ROWS:
        raise forms.FormError(
            f"the filter selects {page.total} rows; the page acts on at most {MAX_ROWS} at once: "
            "narrow it (or use the CLI)"
        )
    return tuple(sorted(row.id for row in page.rows))


async def _run(
    request: web.Request,
    kind: str,
    ids: tuple[int, ...],
    *,
    refunds: model.RefundChoice,
    dry_run: bool,
    reason: str | None,
) -> model.ActionResult:
    store = request.app[STORE]
    selection = model.Selection(ids=ids)
    actor = signed_in(request).name
    if kind == "retry":
        return await store.run(
            commands.retry, selection, dry_run=dry_run, actor=actor, reason=reason
        )
    return await store.run(
        commands.discard, selection, refunds=refunds, dry_run=dry_run, actor=actor, reason=reason
    )


async def preview(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    _operator(request)
    form = await request.post()
    refunds = forms.refund_choice(_fields(form))
    ids = await _selected(request, kind, form)
    result = (
        await _run(request, kind, ids, refunds=refunds, dry_run=True, reason=None) if ids else None
    )
    return render(
        request,
        "preview.html",
        kind=kind,
        ids=ids,
        result=result,
        refunds=refunds.value,
        refund_choices=[c.value for c in model.RefundChoice],
    )


async def act(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    user = _operator(request)
    form = await request.post()
    done = forms.confirmed(_fields(form), _id_values(form))
    result = await _run(
        request, kind, done.ids, refunds=done.refunds, dry_run=False, reason=done.reason
    )
    log.info(
        "outbox.web.action",
        action=kind,
        user=user.name,
        action_id=result.action_id,
        events=[c.event_id for c in result.changes],
        count=result.count,
    )
    if len(done.ids) == 1 or result.action_id is None:
        raise web.HTTPSeeOther(f"/rows/{done.ids[0]}")
    raise web.HTTPSeeOther(f"/actions/{result.action_id}")


for _kind in KINDS:
    routes.post(f"/actions/{{kind:{_kind}}}/preview")(preview)
    routes.post(f"/actions/{{kind:{_kind}}}")(act)
