"""Answers on the chat page are rendered markdown, sanitized, while they stream.

The scripted model writes the answers: a test tool hands it markdown parts
(the model's answer quotes each tool result as it is), and its echo of the
question carries hostile HTML into an answer. Each browser script runs in a
worker thread, as in test_web_page.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import trio

from netra.testing import config_for_tests, open_server, token_for
from netra.tools import tool

from .test_web_page import ARTIFACTS, browser_page, expect, in_browser, last_turn, send, sign_in

pytestmark = pytest.mark.browser

#: Markdown the `md` tool returns, by part; the scripted model's answer is
#: "Here is what I found for “…”: md returned <part>; md returned <part>…",
#: and each part stands apart as its own blocks. At most 200 characters each
#: (the scripted model quotes no more of a tool result).
PARTS = {
    "intro": "\n\n## Release notes\n\n- **fast** start\n- a `code` span\n  1. nested\n\n",
    "code": '\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n',
    "table": "\n\n| name | score |\n|:-----|------:|\n| ada | 3 |\n| bob | 12 |\n\n",
    "links": (
        "\n\n[docs](https://example.com/docs) and [mail](mailto:team@example.com) "
        "and [bad](javascript:window.__pwned='link') and [relative](/api/threads)\n\n"
    ),
    "tall": "\n\n" + "line\n" * 38 + "\n",
}
assert all(len(text) <= 200 for text in PARTS.values())


@tool
async def md(part: str) -> str:
    """A piece of markdown for the model to quote."""
    return PARTS[part]


def ask(*parts: str, stream: int | None = None) -> str:
    markers = " ".join(f"[[tool:md {json.dumps({'part': p})}]]" for p in parts)
    return f"notes {markers}" + (f" [[stream:{stream}]]" if stream else "")


# Set by anything hostile that ran; the test asserts it never is.
HOSTILE = (
    "<img src=x onerror=\"window.__pwned='img'\"> "
    "<script>window.__pwned='script'</script> "
    "[click me](javascript:window.__pwned='js-link') "
    "<a href=\"javascript:window.__pwned='a'\" onclick=\"window.__pwned='onclick'\">anchor</a> "
    "<b onmouseover=\"document.title='pwned'\">bold</b> "
    "<iframe src=\"javascript:window.__pwned='iframe'\"></iframe> **real bold**"
)

PWNED = "() => window.__pwned === undefined && document.title === 'netra chat'"


async def test_markdown_answer_structure_streaming_and_copy():
    config = config_for_tests(scripted_delay_ms=25)
    async with open_server(config, extra_tools=[md]) as server:
        token = token_for(server, "ada")

        def script() -> None:
            with browser_page() as page:
                page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.http_url)
                sign_in(page, server.http_url, token)
                # every state of the answer on screen while it streams
                page.evaluate(
                    """() => {
                         window.__frames = [];
                         new MutationObserver(() => {
                           const t = [...document.querySelectorAll('.turn.assistant')].pop();
                           if (!t) return;
                           const pre = t.querySelector('.answer pre');
                           window.__frames.push({ state: t.dataset.state, pre: pre ? pre.textContent : null,
                                                  text: t.querySelector('.answer').textContent });
                         }).observe(document.getElementById('messages'),
                                    { childList: true, subtree: true, characterData: true });
                       }"""
                )
                send(page, ask("intro", "code", "table", "links", stream=120))
                turn = last_turn(page)
                expect(turn).to_have_attribute("data-state", "completed")
                answer = turn.locator(".answer")

                # structure
                expect(answer.locator("h2")).to_have_text("Release notes")
                expect(answer.locator("ul > li")).to_have_count(2)
                expect(answer.locator("ul > li strong")).to_have_text("fast")
                expect(answer.locator("ul > li > code")).to_have_text("code")
                expect(answer.locator("ul ol > li")).to_have_text("nested")
                block = answer.locator(".code-block")
                expect(block).to_have_count(1)
                expect(block.locator(".lang")).to_have_text("python")
                expect(block.locator("pre > code.language-python")).to_have_text("def add(a, b):\n    return a + b\n")
                table = answer.locator(".table-wrap > table")
                expect(table.locator("thead th")).to_have_text(["name", "score"])
                expect(table.locator("tbody tr")).to_have_count(2)
                expect(table.locator("tbody tr").nth(1).locator("td")).to_have_text(["bob", "12"])
                expect(table.locator("tbody td").nth(1)).to_have_attribute("align", "right")
                docs = answer.get_by_role("link", name="docs")
                expect(docs).to_have_attribute("href", "https://example.com/docs")
                expect(docs).to_have_attribute("target", "_blank")
                expect(docs).to_have_attribute("rel", "noopener noreferrer")
                expect(answer.get_by_role("link", name="mail")).to_have_attribute("href", "mailto:team@example.com")
                # a javascript: or relative link keeps its text and loses its href
                for name in ("bad", "relative"):
                    dead = answer.locator("a", has_text=name)
                    expect(dead).to_have_count(1)
                    assert dead.get_attribute("href") is None
                expect(answer.locator("a[href]")).to_have_count(2)
                dead = answer.locator("a", has_text="bad")
                dead.click()
                page.wait_for_timeout(200)
                assert page.evaluate(PWNED)
                # the markers and the model's own words are there too, as text
                expect(answer).to_contain_text("Here is what I found for “notes”")
                ARTIFACTS.mkdir(exist_ok=True)
                turn.screenshot(path=str(ARTIFACTS / "web-markdown.png"))

                # while it streamed: code showed as code before its fence closed,
                # and the finished blocks above were not rebuilt (no flicker)
                frames = page.evaluate("window.__frames")
                running = [f for f in frames if f["state"] == "running"]
                assert len(running) > 10, frames[-3:]
                assert any(f["pre"] is not None and "def add" in f["pre"] and "return" not in f["pre"]
                           for f in running), "an unclosed fence did not render as code mid-stream"
                assert not any(f["pre"] is None and "```" in f["text"] and "def add" in f["text"] for f in running)

                # the copy button puts the code on the clipboard
                block.get_by_role("button", name="Copy the python code").click()
                expect(block.locator("button.copy")).to_have_text("Copied")
                copied = page.evaluate("navigator.clipboard.readText()")
                assert copied == "def add(a, b):\n    return a + b"
                expect(block.locator("button.copy")).to_have_text("Copy", timeout=5000)

                # the page still follows its own Content-Security-Policy; a read-back
                # conversation renders the same
                page.reload()
                expect(last_turn(page).locator(".answer h2")).to_have_text("Release notes")
                expect(last_turn(page).locator(".answer .code-block")).to_have_count(1)
                expect(last_turn(page).locator(".answer a[href]")).to_have_count(2)

        await in_browser(script)


async def test_stable_blocks_keep_their_nodes_while_an_answer_streams():
    """A block already on screen is not rebuilt as text arrives after it, so a
    copy button, a selection or a scrolled code block above stays put."""
    config = config_for_tests(scripted_delay_ms=25)
    async with open_server(config, extra_tools=[md]) as server:
        token = token_for(server, "bo")

        def script() -> None:
            with browser_page() as page:
                sign_in(page, server.http_url, token)
                send(page, ask("code", "table", stream=80))
                turn = last_turn(page)
                page.wait_for_function(
                    """() => { const t = [...document.querySelectorAll('.turn.assistant')].pop();
                               const b = t && t.querySelector('.code-block');
                               // the fence has closed and more text came after it
                               if (!b || !t.querySelector('.answer').textContent.includes('; md returned')) return false;
                               window.__block = b; return t.dataset.state === 'running'; }"""
                )
                expect(turn).to_have_attribute("data-state", "completed")
                assert page.evaluate(
                    "() => window.__block.isConnected && document.querySelector('.turn.assistant:last-child .code-block') === window.__block"
                )

        await in_browser(script)


async def test_a_burst_of_deltas_is_rendered_once_per_animation_frame():
    """Deltas that arrive faster than the screen refreshes are rendered
    together: never more renders of the answer than animation frames."""
    async with open_server(config_for_tests()) as server:
        token = token_for(server, "dee")

        def script() -> None:
            with browser_page() as page:
                deltas: list[str] = []
                page.on("websocket", lambda ws: ws.on(
                    "framereceived", lambda frame: '"text_delta"' in str(frame) and deltas.append("d")))
                sign_in(page, server.http_url, token)
                page.evaluate(
                    """() => {
                         window.__renders = 0; window.__ticks = 0; window.__counting = true;
                         const tick = () => { if (window.__counting) { window.__ticks++; requestAnimationFrame(tick); } };
                         requestAnimationFrame(tick);
                         new MutationObserver((records) => {
                           if (records.some((r) => r.target.closest && r.target.closest('.answer'))) window.__renders++;
                         }).observe(document.getElementById('messages'), { childList: true, subtree: true, characterData: true });
                       }"""
                )
                send(page, "[[stream:300]] a long answer")
                expect(last_turn(page)).to_have_attribute("data-state", "completed")
                renders, ticks = page.evaluate("() => { window.__counting = false; return [window.__renders, window.__ticks]; }")
                expect(last_turn(page).locator(".answer")).to_contain_text("You said: “a long answer”")
                assert len(deltas) >= 100, len(deltas)  # the chunks came one event each
                assert 1 <= renders <= ticks + 2, (renders, ticks)
                assert renders < len(deltas), (renders, len(deltas))

        await in_browser(script)


async def test_hostile_html_in_an_answer_does_nothing_and_the_user_text_stays_text():
    async with open_server(config_for_tests(scripted_delay_ms=10)) as server:
        token = token_for(server, "eve")

        def script() -> None:
            with browser_page() as page:
                sign_in(page, server.http_url, token)
                send(page, f"# Not a heading\n\n{HOSTILE}")
                user = page.locator("#messages .turn.user").last
                # the user's own message: literal text, no markup at all
                expect(user.locator(".text")).to_have_text(f"# Not a heading\n\n{HOSTILE}")
                assert user.locator(".text *").count() == 0
                turn = last_turn(page)
                expect(turn).to_have_attribute("data-state", "completed")
                answer = turn.locator(".answer")
                # the model echoed it: markdown renders, the HTML is shown as text
                expect(answer.locator("strong")).to_have_text("real bold")
                expect(answer).to_contain_text("<script>window.__pwned='script'</script>")
                expect(answer).to_contain_text("<img src=x onerror=")
                for selector in ("img", "script", "iframe", "[onclick]", "[onerror]", "[onmouseover]",
                                 "a[href^=javascript]", "[style]"):
                    assert answer.locator(selector).count() == 0, selector
                assert answer.evaluate(
                    "a => [...a.querySelectorAll('*')].every(e => [...e.attributes].every(x => !x.name.startsWith('on')))"
                )
                link = answer.locator("a", has_text="click me")
                expect(link).to_have_count(1)
                assert link.get_attribute("href") is None
                for node in (link, answer.locator("strong")):
                    node.hover()
                    node.click()
                page.wait_for_timeout(300)
                assert page.evaluate(PWNED)

                # the renderer itself, given what a hostile model might write
                vectors = [
                    "<img src=x onerror=\"window.__pwned='img2'\">",
                    "<svg><script>window.__pwned='svg'</script></svg>",
                    "[x](JaVaScRiPt:window.__pwned='case')",
                    "[x](java&#09;script:window.__pwned='tab')",
                    "<javascript:window.__pwned='autolink'>",
                    "![x](javascript:window.__pwned='image')",
                    "[x](data:text/html,<script>window.__pwned='data'</script>)",
                    '[x](https://example.com "a\\" onmouseover=\\"window.__pwned=\'title\'")',
                    "<details open ontoggle=\"window.__pwned='toggle'\">",
                    "<form action=\"javascript:window.__pwned='form'\"><button>go</button></form>",
                    "<a href=\"https://example.com\" style=\"position:fixed\">styled</a>",
                    "```\n</code></pre><img src=x onerror=\"window.__pwned='fence'\">\n```",
                    "| a |\n|---|\n| <img src=x onerror=\"window.__pwned='cell'\"> |",
                ]
                result = page.evaluate(
                    """async (vectors) => {
                         const { renderMarkdown } = await import('/static/markdown.js');
                         const box = document.createElement('div');
                         document.body.append(box);
                         for (const v of vectors) box.append(renderMarkdown(v));
                         await new Promise((r) => setTimeout(r, 300));
                         for (const e of box.querySelectorAll('*')) e.dispatchEvent(new MouseEvent('mouseover', { bubbles: true }));
                         for (const e of box.querySelectorAll('a:not([href]), button, summary')) e.click();
                         await new Promise((r) => setTimeout(r, 100));
                         const hrefs = [...box.querySelectorAll('a[href]')].map((a) => a.getAttribute('href'));
                         const tags = [...new Set([...box.querySelectorAll('*')].map((e) => e.localName))];
                         const attrs = [...new Set([...box.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name)))];
                         box.remove();
                         return { hrefs, tags, attrs };
                       }""",
                    vectors,
                )
                assert page.evaluate(PWNED)
                assert all(h.startswith("https://example.com") for h in result["hrefs"]), result
                assert not {"img", "script", "svg", "iframe", "form", "details", "style"} & set(result["tags"]), result
                assert not [a for a in result["attrs"] if a.startswith("on") or a in ("style", "src", "action")], result

        await in_browser(script)


async def test_the_log_follows_the_answer_until_the_reader_scrolls_up():
    config = config_for_tests(scripted_delay_ms=15)
    async with open_server(config, extra_tools=[md]) as server:
        token = token_for(server, "cy")

        def script() -> None:
            with browser_page(height=500) as page:
                sign_in(page, server.http_url, token)
                send(page, ask("tall", "tall", stream=150))
                # at the end while it grows
                page.wait_for_function(
                    """() => { const log = document.getElementById('log');
                               const t = [...document.querySelectorAll('.turn.assistant')].pop();
                               return t && t.dataset.state === 'running' && log.scrollHeight > log.clientHeight + 300; }"""
                )
                gap = page.evaluate("() => { const l = document.getElementById('log'); return l.scrollHeight - l.scrollTop - l.clientHeight; }")
                assert gap < 40, gap
                # the reader scrolls up: the view stays where they put it
                page.locator("#log").evaluate("log => log.scrollTop = 0")
                page.wait_for_timeout(300)
                assert last_turn(page).get_attribute("data-state") == "running"
                expect(last_turn(page)).to_have_attribute("data-state", "completed")
                assert page.locator("#log").evaluate("log => log.scrollTop") == 0
                # back at the end, the next answer is followed again
                page.locator("#log").evaluate("log => log.scrollTop = log.scrollHeight")
                send(page, ask("tall", stream=60))
                expect(last_turn(page)).to_have_attribute("data-state", "completed")
                page.wait_for_timeout(100)
                gap = page.evaluate("() => { const l = document.getElementById('log'); return l.scrollHeight - l.scrollTop - l.clientHeight; }")
                assert gap < 40, gap

        await in_browser(script)


async def test_vendored_libraries_are_served_under_the_page_policy():
    async with open_server(config_for_tests()) as server:
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=server.http_url) as client:
                for name in ("marked.esm.js", "purify.min.js"):
                    answer = await client.get(f"/static/vendor/{name}")
                    assert answer.status_code == 200
                    assert answer.headers["content-type"].startswith("text/javascript")
                    policy = answer.headers["content-security-policy"]
                    assert "script-src 'self';" in policy and "unsafe" not in policy
                answer = await client.get("/static/markdown.js")
                assert answer.status_code == 200
                for missing in ("/static/vendor/marked.LICENSE", "/static/vendor/README.md",
                                "/static/nope/marked.esm.js", "/static/vendor/%2e%2e%2fapp.js"):
                    assert (await client.get(missing)).status_code == 404, missing
                page = (await client.get("/")).text
                assert re.search(r"<script(?![^>]*\bsrc=)", page) is None  # no inline script
