"""Approving tool calls on the chat page, in a real browser against a real
server (see test_web_page.py for how the browser is driven)."""

from __future__ import annotations

import re

import pytest

from netra.testing import open_server, token_for

from .test_approvals import TOOLS, TRANSFER
from .test_web_page import ARTIFACTS, browser_page, expect, in_browser, last_turn, send, sign_in, sqlite_config

pytestmark = pytest.mark.browser


async def test_approve_deny_and_edit_from_the_page(tmp_path):
    """The call shows with its arguments and Approve / Deny; each decision
    shows in the card and in the tool call; edited arguments that do not
    fit are refused on the card and the call still waits; after a reload the
    thread shows how each approval ended."""
    async with open_server(sqlite_config(tmp_path), extra_tools=TOOLS) as server:
        token = token_for(server, "alice")

        def script() -> None:
            with browser_page() as page:
                sign_in(page, server.http_url, token)
                send(page, TRANSFER)
                turn = last_turn(page)
                card = turn.locator(".approval")
                expect(card).to_contain_text("⚙ transfer asks for your approval")
                expect(card.locator(".args")).to_have_text('{"amount":5,"to":"bo"}')
                expect(card.locator(".expires")).to_have_text(re.compile(r"until "))
                expect(turn).to_have_attribute("data-state", "waiting")
                expect(turn.locator(".state")).to_have_text("waiting for your approval of transfer…")
                expect(turn.locator(".tool")).to_have_count(0)  # nothing runs before the decision
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "web-approval.png"))
                card.get_by_role("button", name="Approve").click()
                expect(turn).to_have_attribute("data-state", "completed")
                expect(card).to_have_attribute("data-state", "approved")
                expect(card.locator(".approval-outcome")).to_have_text("Approved.")
                expect(card.get_by_role("button")).to_have_count(0)
                expect(turn.locator(".tool-outcome")).to_have_text(re.compile(r'^→ \{"sent":5,"to":"bo"\} · \d+ ms$'))

                send(page, TRANSFER)
                turn = last_turn(page)
                card = turn.locator(".approval")
                card.get_by_label("Reason to deny").fill("not this month")
                card.get_by_role("button", name="Deny").click()
                expect(turn).to_have_attribute("data-state", "completed")
                expect(card).to_have_attribute("data-state", "denied")
                expect(card.locator(".approval-outcome")).to_have_text(
                    "Denied: the user declined this call: not this month."
                )
                expect(turn.locator(".tool-outcome")).to_contain_text("✗ the user declined this call: not this month")
                expect(turn.locator(".answer")).to_contain_text("transfer failed: the user declined this call")

                send(page, TRANSFER)
                turn = last_turn(page)
                card = turn.locator(".approval")
                card.get_by_text("Edit arguments").click()
                box = card.get_by_label("Arguments for transfer")
                box.fill('{"amount": "lots", "to": "bo"}')
                card.get_by_role("button", name="Approve").click()
                expect(card.locator(".approval-outcome")).to_contain_text(
                    "bad_request: The server did not understand the message. the edited arguments do not fit "
                    "transfer: argument 'amount' must be an integer, got string."
                )
                expect(card).to_have_attribute("data-state", "pending")
                box.fill("[1, 2]")
                card.get_by_role("button", name="Approve").click()
                expect(card.locator(".approval-outcome")).to_have_text("The edited arguments must be a JSON object.")
                box.fill('{"amount": 2, "to": "cy"}')
                card.get_by_role("button", name="Approve").click()
                expect(card.locator(".approval-outcome")).to_have_text(
                    'Approved with edited arguments {"amount":2,"to":"cy"}.'
                )
                expect(turn.locator(".tool-outcome")).to_contain_text('→ {"sent":2,"to":"cy"}')
                expect(turn).to_have_attribute("data-state", "completed")

                page.reload()
                expect(page.locator("#messages .turn")).to_have_count(6)
                outcomes = page.locator("#messages .approval .approval-outcome")
                expect(outcomes).to_have_text([
                    "Approved.",
                    "Denied: not this month.",
                    'Approved with edited arguments {"amount":2,"to":"cy"}.',
                ])
                expect(page.locator("#messages .approval button")).to_have_count(0)

        await in_browser(script)


async def test_a_waiting_call_can_be_approved_from_another_tab(tmp_path):
    """A second tab of the same user opens the conversation, finds the call
    waiting there, and approves it: the run goes on in the first tab."""
    async with open_server(sqlite_config(tmp_path), extra_tools=TOOLS) as server:
        token = token_for(server, "alice")

        def script() -> None:
            with browser_page() as first:
                sign_in(first, server.http_url, token)
                send(first, TRANSFER)
                turn = last_turn(first)
                expect(turn.locator(".approval")).to_have_attribute("data-state", "pending")
                other = first.context.browser.new_page()
                other.set_default_timeout(10_000)
                sign_in(other, server.http_url, token)
                other.locator("#thread-list button").first.click()
                card = other.locator("#messages .approval")
                expect(card).to_contain_text("⚙ transfer asks for your approval")
                card.get_by_role("button", name="Approve").click()
                expect(card.locator(".approval-outcome")).to_have_text(
                    "Decision sent: the run goes on where it started."
                )
                expect(turn).to_have_attribute("data-state", "completed")
                expect(turn.locator(".approval")).to_have_attribute("data-state", "approved")
                expect(turn.locator(".tool-outcome")).to_contain_text('→ {"sent":5,"to":"bo"}')

        await in_browser(script)
