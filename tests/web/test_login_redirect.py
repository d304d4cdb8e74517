"""After sign-in the page follows ``next`` only to the node's own pages (real Chromium).

``/\\host`` passes a naive "starts with one slash" check, but browsers read the backslash as a
slash and go to ``//host``: the page must judge ``next`` as the browser resolves it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from tests.web.conftest import Node, new_page

pytestmark = pytest.mark.e2e

HOSTILE = [
    "/\\evil.example/",
    "//evil.example/",
    "\\\\evil.example/",
    "/\t/evil.example/",
    "https://evil.example/",
    "javascript:alert(1)",
    "http://127.0.0.1:1/",
]


def _sign_in_with_next(page: Any, node: Node, next_path: str) -> str:
    page.goto("/login?next=" + quote(next_path, safe=""))
    page.fill("#name", "tech")
    page.fill("#password", "correct horse battery staple")
    page.click("#sign-in")
    page.wait_for_url(lambda url: urlsplit(url).path != "/login")
    return str(page.url)


def test_next_leads_only_to_the_nodes_own_pages(browser: Any, web_nodes: tuple[Node, Node]) -> None:
    sender, _ = web_nodes
    page = new_page(browser, sender)
    try:
        landed = _sign_in_with_next(page, sender, "/\\evil.example/")
        assert landed == sender.url + "/", landed
        # the same judgement for every other trick, as the sign-in page makes it
        page.goto("/login")
        page.wait_for_function("typeof window.p2pshareSafeNext === 'function'")
        for hostile in HOSTILE:
            assert page.evaluate("n => window.p2pshareSafeNext(n)", hostile) == "/", hostile
        assert page.evaluate("n => window.p2pshareSafeNext(n)", "/transfers?x=1#a") == (
            "/transfers?x=1#a"
        )
        page.context.clear_cookies()
        landed = _sign_in_with_next(page, sender, "/transfers")
        assert landed == sender.url + "/transfers"
    finally:
        page.context.close()
