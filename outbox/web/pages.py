"""The read-only pages and their JSON mirror: the overview, the failed and blocked rows, one row,
one key, one customer, an action's record; /api/... answer with exactly the JSON `outbox status |
failed | show --json` prints (outbox.ops.cli.to_json of the same results)."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import sqlalchemy as sa
import structlog
from aiohttp import web

from outbox.domain import EventType
from outbox.ops import commands, model
from outbox.ops.cli import to_json
from outbox.text import first_line
from outbox.web import chart, forms
from outbox.web.app import CONFIG, STORE, Handler, error_page, render

log = structlog.get_logger("outbox.web")
routes = web.RouteTableDef()


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A bad filter is 400, an unknown row 404, an action refused 409, the database away 503:
    one line each, as the CLI says it (the database URL's password never in it)."""
    try:
        return await handler(request)
    except forms.FormError as exc:
        status, message = 400, str(exc)
    except model.OpsError as exc:
        status, message = (404 if request.method == "GET" else 409), str(exc)
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        log.error("outbox.web.database_error", path=request.path, error=first_line(cause))
        status, message = 503, "the database could not be asked; try again in a moment"
    return error_page(request, status, message)


def _json(result: Any) -> web.Response:
    return web.json_response(to_json(result), dumps=_dumps)


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=2)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    await request.app[STORE].ping()
    return web.Response(text="ok")


async def stylesheet(request: web.Request) -> web.Response:
    css = resources.files("outbox.web").joinpath("static", "app.css").read_text(encoding="utf-8")
    return web.Response(
        text=css, content_type="text/css", headers={"Cache-Control": "max-age=3600"}
    )


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    """What needs a person (ops.attention: `outbox status`'s problems without counting the
    delivered rows, which would read the whole table) and the chart."""
    store = request.app[STORE]
    report, activity = await asyncio.gather(
        store.attention(request.app[CONFIG].max_pending_age), store.activity()
    )
    return render(request, "overview.html", report=report, chart=chart.build(activity))


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    """Every row by type, status and outcome, delivered included: `outbox status` itself."""
    report = await request.app[STORE].status(request.app[CONFIG].max_pending_age)
    return render(request, "status.html", report=report)


@routes.get("/api/status")
async def api_status(request: web.Request) -> web.Response:
    return _json(await request.app[STORE].status(request.app[CONFIG].max_pending_age))


async def _failed(request: web.Request) -> model.FailedPage:
    query = request.query
    filters = forms.filters(query)
    limit = forms.positive(query, "limit", forms.PER_PAGE, forms.MAX_PER_PAGE)
    page = forms.positive(query, "page", 1)
    return await request.app[STORE].failed(filters, limit=limit, page=page)


@routes.get("/rows")
async def rows(request: web.Request) -> web.Response:
    found = await _failed(request)
    query = request.query
    return render(
        request,
        "rows.html",
        found=found,
        form={n: query.get(n, "") for n in forms.FILTER_FIELDS},
        outcomes=[o.value for o in (*model.FAILED_OUTCOMES, *model.SKIPPED_ROW_OUTCOMES)],
        statuses=forms.STATUS_CHOICES,
        types=[t.value for t in EventType],
        page_query=lambda n: forms.filter_query(query, page=n, limit=query.get("limit")),
        filter_fields={n: query[n] for n in forms.FILTER_FIELDS if query.get(n, "").strip()},
    )


@routes.get("/api/rows")
async def api_rows(request: web.Request) -> web.Response:
    return _json(await _failed(request))


async def _shown(request: web.Request) -> tuple[str, Any]:
    """The row, key or customer the path and query name, as `outbox show` finds them."""
    store = request.app[STORE]
    if "id" in request.match_info:
        event_id = forms.event_id(request.match_info["id"])
        return f"event {event_id}", await store.run(commands.show_event, event_id)
    if request.path.endswith("/key"):
        key = request.query.get("key", "")
        if not key:
            raise forms.FormError("key: give a transaction key")
        return f"transaction key {key}", await store.run(commands.show_key, key)
    customer = request.query.get("customer", "")
    if not customer:
        raise forms.FormError("customer: give a customer key")
    return f"customer {customer}", await store.run(commands.show_customer, customer)


async def shown_page(request: web.Request) -> web.Response:
    title, shown = await _shown(request)
    events = [shown.event] if isinstance(shown, model.EventShown) else list(shown.events)
    return render(request, "events.html", title=title, events=events, shown=shown)


async def shown_json(request: web.Request) -> web.Response:
    _, shown = await _shown(request)
    return _json(shown)


for _path in ("/rows/{id}", "/key", "/customer"):
    routes.get(_path)(shown_page)
    routes.get("/api" + _path)(shown_json)


@routes.get(r"/actions/{id:\d+}")
async def action_page(request: web.Request) -> web.Response:
    action_id = forms.event_id(request.match_info["id"])
    record = await request.app[STORE].action(action_id)
    if record is None:
        raise model.OpsError(f"no operator action with id {action_id}")
    return render(request, "action.html", record=record)
