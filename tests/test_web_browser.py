"""`outbox web` in a real browser (Debian's Chromium, driven by Playwright): a person who has never
used a terminal signs in, sees from the overview that something needs attention, finds the
failed sale by its key, previews and retries it with a reason, sees a running daemon deliver
it, and sees the action in the row's history. The sale's key is markup
(`<img src=x onerror=alert(1)>`): it shows as text on every page and never runs.

Without Chromium or Playwright the test is skipped, unless OUTBOX_BROWSER_REQUIRED=1 (CI sets
it, after installing Debian's chromium), which makes a missing browser a failure.
Set OUTBOX_WEB_SCREENSHOT=PATH to keep a picture of the overview (docs/operations.md has one).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import API_KEY, DaemonThread, insert_sales, make_settings, wait_until
from tests.web.server import PASSWORDS, WebServer, config

CHROMIUM = os.environ.get("OUTBOX_CHROMIUM", "/usr/bin/chromium")
# The flags the machine's notes give for Chromium here: no sandbox (root), and none of its
# background traffic to Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS_KEY = "<img src=x onerror=alert(1)>"


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("OUTBOX_BROWSER_REQUIRED") == "1":
            pytest.fail(f"OUTBOX_BROWSER_REQUIRED=1 but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_a_person_finds_a_failed_sale_by_its_key_and_retries_it(
    browser: Any, engine: sa.Engine, database_url: str
) -> None:
    from playwright.sync_api import expect

    fake_config = FakeConfig(api_key=API_KEY, dedupe=False, seed=7)
    with FakePartneroThread(fake_config) as fake:
        # Partnero refuses the sale with a 400 it does not document: failed at once.
        fake.configure(odd_answers={XSS_KEY: {"answer": "bad_request"}})
        insert_sales(engine, ["inv_fine", XSS_KEY])
        with (
            DaemonThread(make_settings(database_url, fake.url)),
            WebServer(database_url, [config()]) as web,
        ):
            wait_until(lambda: _status(engine, XSS_KEY) == "failed", what="the sale failed")
            fake.configure(odd_answers={})  # the cause is fixed at Partnero
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

            # Sign in: the overview is behind the login form.
            page.goto(web.url() + "/")
            expect(page).to_have_url(re.compile(r"/login"))
            page.get_by_label("Name").fill("alice")
            page.get_by_label("Password").fill(PASSWORDS["alice"])
            page.get_by_role("button", name="Sign in").click()

            # The overview says something is wrong, and links to it.
            expect(page.get_by_role("heading", name="Attention needed")).to_be_visible()
            if path := os.environ.get("OUTBOX_WEB_SCREENSHOT"):
                page.screenshot(path=Path(path), full_page=True)
            page.get_by_role("link", name=re.compile(r"1\s+failed")).click()

            # Find the sale by its key (the filter form), then open it.
            page.get_by_label("key", exact=True).fill(XSS_KEY)
            page.get_by_role("button", name="Filter").click()
            rows = page.locator("table.rows tbody tr")
            expect(rows).to_have_count(1)
            expect(rows.first.get_by_role("link", name=XSS_KEY, exact=True)).to_be_visible()
            rows.first.locator("td.num a").first.click()
            expect(page.get_by_role("heading", level=2).first).to_contain_text(XSS_KEY)
            expect(page.locator(".state").first).to_have_text(re.compile(r"failed"))

            # Preview the retry: exactly this row; a reason is required; confirm.
            page.get_by_role("button", name="Preview a retry…").click()
            expect(page.get_by_role("heading", name="Preview: retry")).to_be_visible()
            changes = page.locator("table.changes tbody tr")
            expect(changes).to_have_count(1)
            expect(changes.first).to_contain_text(XSS_KEY)
            page.get_by_label(re.compile(r"^Reason")).fill("fixed at Partnero, ticket 4803")
            page.get_by_role("button", name="Confirm: retry 1 row").click()

            # Back on the row's page: the daemon delivers it; the action is in its history.
            wait_until(lambda: _status(engine, XSS_KEY) == "delivered", what="the retry sent")
            page.reload()
            expect(page.locator(".state").first).to_have_text(re.compile(r"delivered"))
            history = page.locator("ul.history li")
            expect(history).to_have_count(1)
            expect(history.first).to_contain_text("by alice")
            expect(history.first).to_contain_text("reason: fixed at Partnero, ticket 4803")

            # The markup in the key never became an element, and no script ran.
            assert page.locator("img").count() == 0
            assert dialogs == []
            page.close()
        assert [t["key"] for t in fake.ledger() if t["key"] == XSS_KEY] == [XSS_KEY]


def _status(engine: sa.Engine, key: str) -> str | None:
    with engine.connect() as conn:
        sql = "SELECT status FROM outbox.events WHERE transaction_key = :k AND event_type = 'sale'"
        return conn.execute(sa.text(sql), {"k": key}).scalar()
