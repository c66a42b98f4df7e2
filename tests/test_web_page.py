"""The chat page in a real browser against a real server.

Headless Chromium (the Debian package; Playwright never downloads a browser
here) is driven by Playwright's sync API. That API is bound to the thread
that started it, and the server runs in this test's trio loop, so each
browser script runs in a worker thread (``trio.to_thread.run_sync``) while
the loop keeps serving. Every Playwright call has its own timeout, which is
what bounds a script: a trio deadline cannot interrupt a worker thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from netra.testing import config_for_tests, open_server, token_for

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)", allow_module_level=True)
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:
    pytest.skip("the playwright package is not installed (pip install playwright)", allow_module_level=True)

ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CALC = 'what is [[tool:calculator {"expression": "6*7"}]]'
STEP_MS = 10_000  # every single Playwright action or expectation
SCRIPT_S = 90  # a whole browser script (backstop; see the module docstring)


@contextmanager
def browser_page(*, width: int = 1100, height: int = 760) -> Iterator[Page]:
    """A fresh browser and page; uncaught page errors fail the test."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(STEP_MS)
            expect.set_options(timeout=STEP_MS)
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
            page.on("console", lambda msg: "Content Security Policy" in msg.text and problems.append(msg.text))
            yield page
            assert not problems, problems
        finally:
            browser.close()


async def in_browser(script: Callable[..., Any], *args: Any) -> Any:
    with trio.fail_after(SCRIPT_S):
        return await trio.to_thread.run_sync(script, *args)


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url)
    page.get_by_label("Access token (JWT)").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#status")).to_have_text(re.compile("Connected as"))


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def last_turn(page: Page):
    return page.locator("#messages .turn.assistant").last


def sqlite_config(tmp_path: Path, **overrides: Any):
    return config_for_tests(database_url=f"sqlite:///{tmp_path / 'netra.sqlite3'}", **overrides)


# -- tests ----------------------------------------------------------------------


async def test_message_streams_with_tool_progress(tmp_path):
    """Send a message: the answer streams in, the tool call shows its
    arguments, result and duration, the thread appears in the list and
    survives a reload. Saves the screenshots in artifacts/."""
    config = sqlite_config(tmp_path, dev_mode=True, scripted_delay_ms=150)
    async with open_server(config) as server:
        token = token_for(server, "alice")

        def script() -> None:
            with browser_page() as page:
                sign_in(page, server.http_url, token)
                box = page.get_by_label("Message", exact=True)
                box.fill("first line")
                box.press("Shift+Enter")  # a newline, not a send
                box.press_sequentially(CALC)
                assert page.locator("#messages .turn").count() == 0
                box.press("Enter")
                user = page.locator("#messages .turn.user").last
                expect(user.locator(".text")).to_have_text("first line\n" + CALC)
                turn = last_turn(page)
                # streaming: part of the answer is on screen before the run ends
                page.wait_for_function(
                    """() => { const t = [...document.querySelectorAll('.turn.assistant')].pop();
                               const a = t && t.querySelector('.answer');
                               return t && t.dataset.state === 'running' && a.textContent.length > 0
                                      && a.getAttribute('aria-busy') === 'true'; }"""
                )
                expect(turn).to_have_attribute("data-state", "completed")
                expect(turn.locator(".answer")).to_contain_text("calculator returned 42")
                expect(turn.locator(".answer")).to_have_attribute("aria-busy", "false")
                expect(turn.locator(".agent")).to_have_text("assistant")
                expect(turn.locator(".state")).to_have_text(re.compile(r"done in \d+ ms"))
                expect(turn.locator(".thinking").first).to_contain_text("Step 1")
                tool = turn.locator(".tool")
                expect(tool).to_have_count(1)
                expect(tool).to_contain_text("⚙ calculator")
                expect(tool.locator(".args")).to_have_text('{"expression":"6*7"}')
                expect(tool.locator(".tool-outcome")).to_have_text(re.compile(r"^→ 42 · \d+ ms$"))
                # the conversation continues on the same thread
                expect(page.locator("#thread-list li")).to_have_count(1)
                send(page, 'and [[tool:calculator {"expression": "2**10"}]]')
                expect(last_turn(page)).to_have_attribute("data-state", "completed")
                expect(last_turn(page).locator(".tool-outcome")).to_contain_text("→ 1024")
                expect(page.locator("#thread-list li")).to_have_count(1)
                expect(page.locator("#thread-list button[aria-current=true]")).to_have_count(1)
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "web-chat.png"))
                # a reload keeps the sign-in (this tab) and reads the thread back
                page.reload()
                expect(page.locator("#status")).to_have_text("Connected as alice")
                expect(page.locator("#messages .turn")).to_have_count(4)
                expect(last_turn(page).locator(".tool-outcome")).to_contain_text("→ 1024")
                # phone width: one column, nothing wider than the screen
                page.set_viewport_size({"width": 390, "height": 844})
                expect(page.get_by_role("button", name="Conversations")).to_be_visible()
                expect(page.locator("#thread-list")).to_be_hidden()
                expect(page.get_by_label("Message", exact=True)).to_be_visible()
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
                page.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"))

        await in_browser(script)


async def test_stop_cancels_a_long_run():
    """The Stop button and Escape both cancel the run in progress; a failed
    run shows its agent_error code and message."""
    async with open_server(config_for_tests()) as server:
        token = token_for(server, "bob")

        def script() -> None:
            with browser_page() as page:
                sign_in(page, server.http_url, token)
                expect(page.locator("#threads")).to_be_visible()  # no database: the memory store still lists threads
                stop = page.get_by_role("button", name="Stop")
                expect(stop).to_be_disabled()
                for how in ("button", "escape"):
                    send(page, '[[tool:sleep {"ms": 20000}]]')
                    turn = last_turn(page)
                    expect(turn.locator(".tool")).to_contain_text("⚙ sleep")
                    expect(turn.locator(".tool-outcome")).to_have_text("running…")
                    expect(stop).to_be_enabled()
                    if how == "button":
                        stop.click()
                    else:
                        page.keyboard.press("Escape")
                    expect(turn).to_have_attribute("data-state", "cancelled", timeout=5000)
                    expect(turn.locator(".outcome")).to_contain_text("agent_cancelled: client")
                    expect(stop).to_be_disabled()
                # a failed run says why, with its code
                send(page, "[[model:fail]] hello")
                expect(last_turn(page)).to_have_attribute("data-state", "failed")
                expect(last_turn(page).locator(".outcome")).to_contain_text(
                    "Error llm_error: The language model failed. scripted model failure You can try again."
                )

        await in_browser(script)
        assert server.hub.snapshot()["runs_borrowed"] == 0


async def test_bad_token_is_explained():
    async with open_server(config_for_tests()) as server:

        def script() -> None:
            with browser_page() as page:
                page.goto(server.http_url)
                expect(page.get_by_role("button", name="Use a development token")).to_be_hidden()
                page.get_by_label("Access token (JWT)").fill("not-a-jwt")
                page.get_by_role("button", name="Sign in").click()
                alert = page.get_by_role("alert")
                expect(alert).to_contain_text("Sign-in failed: the token was refused or has expired")
                expect(alert).to_contain_text("4401")
                expect(page.get_by_role("button", name="Sign in")).to_be_visible()
                assert page.evaluate("sessionStorage.getItem('netra.token')") is None
                # and nothing reconnects in a loop behind the message
                page.wait_for_timeout(1500)
                expect(page.locator("#status")).to_have_text("Signed out")

        await in_browser(script)
        assert server.hub.snapshot()["connections"] == 0


async def test_reconnects_after_server_restart(tmp_path):
    """Stop the server (a run in flight is cancelled, close 1001), start a new
    one on the same port: the page reconnects by itself, reads the thread
    back from the store, and the next message runs on the same thread."""
    config = sqlite_config(tmp_path, drain_grace_s=0.2)
    async with trio.open_nursery() as nursery:
        first = await nursery.start(_serve_until_stopped, config)
        port = int(first.server.http_url.rsplit(":", 1)[1])
        config = config.replace(port=port)
        url, token = first.server.http_url, token_for(first.server, "carol")
        slot: dict[str, Any] = {}

        async def restart() -> None:
            slot["second"] = await nursery.start(_serve_until_stopped, config)

        def script() -> None:
            with browser_page() as page:
                sign_in(page, url, token)
                send(page, CALC)
                expect(last_turn(page)).to_have_attribute("data-state", "completed")
                send(page, '[[tool:sleep {"ms": 20000}]]')
                expect(last_turn(page).locator(".tool")).to_contain_text("⚙ sleep")
                trio.from_thread.run(first.stop)
                expect(page.get_by_role("alert")).to_contain_text("The server is restarting or shutting down")
                expect(page.get_by_role("alert")).to_contain_text("1001")
                expect(last_turn(page)).to_have_attribute("data-state", "cancelled")
                expect(last_turn(page).locator(".outcome")).to_contain_text("server shut down")
                expect(page.locator("#status")).to_have_text(re.compile("Reconnect"))
                # forget what is on screen: after reconnecting it comes back from the server
                page.evaluate("document.getElementById('messages').replaceChildren()")
                trio.from_thread.run(restart)
                expect(page.locator("#status")).to_have_text("Connected as carol", timeout=20_000)
                expect(page.get_by_role("alert")).to_be_hidden()
                expect(page.locator("#messages .turn")).to_have_count(4)
                expect(page.locator("#messages .turn.assistant").first).to_contain_text("calculator returned 42")
                expect(last_turn(page)).to_have_attribute("data-state", "cancelled")
                send(page, 'again [[tool:calculator {"expression": "1+1"}]]')
                expect(last_turn(page)).to_have_attribute("data-state", "completed")
                expect(last_turn(page).locator(".answer")).to_contain_text("calculator returned 2")
                expect(page.locator("#thread-list li")).to_have_count(1)

        await in_browser(script)
        await slot["second"].stop()


async def test_development_token_button():
    async with open_server(config_for_tests(dev_mode=True)) as server:

        def script() -> None:
            with browser_page() as page:
                page.goto(server.http_url)
                page.get_by_role("button", name="Use a development token").click()
                expect(page.locator("#status")).to_have_text("Connected as dev-user")
                send(page, "hello there")
                expect(last_turn(page).locator(".answer")).to_contain_text("You said: “hello there”")
                page.get_by_role("button", name="Sign out").click()
                expect(page.get_by_role("button", name="Sign in")).to_be_visible()

        await in_browser(script)

    async with open_server(config_for_tests()) as server:

        def not_offered() -> None:
            with browser_page() as page:
                answer = page.request.get(server.http_url + "/api/dev-token")
                assert answer.status == 404
                assert answer.json()["code"] == "not_found"
                page.goto(server.http_url)
                expect(page.get_by_role("button", name="Use a development token")).to_be_hidden()

        await in_browser(not_offered)


async def test_development_token_is_renewed_when_the_dev_server_restarts():
    """A development server makes a new secret each run, so the old token is
    refused (4401) after a restart; a page signed in with a development token
    fetches a new one by itself."""
    config = config_for_tests(dev_mode=True, jwt_secret="first-run-secret-0123456789abcdef")
    async with trio.open_nursery() as nursery:
        first = await nursery.start(_serve_until_stopped, config)
        url = first.server.http_url
        port = int(url.rsplit(":", 1)[1])
        second_config = config.replace(port=port, jwt_secret="second-run-secret-0123456789abcdef")
        slot: dict[str, Any] = {}

        async def restart() -> None:
            await first.stop()
            slot["second"] = await nursery.start(_serve_until_stopped, second_config)

        def script() -> None:
            with browser_page() as page:
                page.goto(url)
                page.get_by_role("button", name="Use a development token").click()
                expect(page.locator("#status")).to_have_text("Connected as dev-user")
                old_token = page.evaluate("sessionStorage.getItem('netra.token')")
                trio.from_thread.run(restart)
                page.wait_for_function(
                    "old => sessionStorage.getItem('netra.token') && sessionStorage.getItem('netra.token') !== old",
                    arg=old_token, timeout=20_000,
                )
                expect(page.locator("#status")).to_have_text("Connected as dev-user")
                send(page, "still here?")
                expect(last_turn(page)).to_have_attribute("data-state", "completed")

        await in_browser(script)
        await slot["second"].stop()


# -- helpers -------------------------------------------------------------------------


class _Running:
    """A server started in the test's nursery that can be stopped on demand."""

    def __init__(self) -> None:
        self.server: Any = None
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


async def _serve_until_stopped(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    running = _Running()
    try:
        async with open_server(config) as server:
            running.server = server
            task_status.started(running)
            await running._stop.wait()
    finally:
        running._stopped.set()


async def test_the_page_resumes_when_its_connection_is_cut_mid_stream():
    """The TCP connection under the page is cut while an answer streams: the
    page resumes its session on a new connection and the answer completes
    on screen, every event once and in order (the page warns on any seq gap
    or repeat), without an interruption."""
    config = config_for_tests(resume_window_s=30.0, scripted_delay_ms=40)
    async with open_server(config) as server:
        token = token_for(server, "pat")

        def cut() -> None:
            [session] = [s for s in server.hub.sessions if s.identity.user_id == "pat"]
            session.transport.abort()  # a reset: no close frame, as when a network drops

        def script() -> list[str]:
            with browser_page() as page:
                warnings: list[str] = []
                page.on("console", lambda msg: "netra: seq" in msg.text and warnings.append(msg.text))
                sign_in(page, server.http_url, token)
                send(page, "[[stream:60]] tell me a long story")
                turn = last_turn(page)
                expect(turn).to_have_attribute("data-state", "running")
                trio.from_thread.run_sync(cut)
                expect(turn).to_have_attribute("data-state", "completed", timeout=20_000)
                expect(page.locator("#status")).to_have_text(re.compile("Connected as"))
                assert "Stopped" not in turn.inner_text()
                return warnings

        warnings = await in_browser(script)
        assert warnings == []
        assert server.hub.metrics.sessions_resumed.labels("resumed")._value.get() == 1
        assert server.hub.metrics.runs_finished.labels("completed", "")._value.get() == 1
