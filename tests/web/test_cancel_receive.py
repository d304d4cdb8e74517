"""Staff cancel a receive: from the receive page and from the transfers page (real browser, real
nodes).

Each receive pairs and then waits for the patient's consent, which nobody gives: a running
receive that stays put until it is cancelled, with no race against the data. Cancelling must
end it on this node (state ``cancelled``, audited with the member of staff's name, no resume)
and tell the sending node, whose offer ends too, naming who cancelled. Only a receiving role
may cancel.

The nodes are this module's own: the other browser tests count the transfers and offers of the
session's shared ``web_nodes`` (test_flow.py expects exactly its three offers, all completed),
and the cancelled transfers made here would stay listed there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import (
    RECEIVER_NAME,
    SENDER_NAME,
    Node,
    new_page,
    sign_in,
    spawn,
    stop,
)

pytestmark = pytest.mark.e2e

WAIT_MS = 30_000  # a ceiling for a busy machine, not a speed requirement
WAIT_S = WAIT_MS / 1000
CLERK = "desk-clerk"  # a sending-role account on the receiving node: it may not cancel
CANCELLED_ON_PAGE = (
    "the transfer was cancelled on this node and what had not been verified was deleted. Ask "
    "the sender to offer the study again if it is still needed"
)
WAITING_FOR_CONSENT = "Waiting for the patient's consent"


@dataclass
class Env:
    sender: Node
    receiver: Node
    study: Path
    base: Path

    def offer(self, consent: str = "patient") -> dict[str, Any]:
        """An offer made with the operator's token; 'patient' waits for a consent never given."""
        body: dict[str, Any] = {"path": str(self.study), "consent": consent}
        if consent != "none":
            body["destination"] = self.receiver.name
        status, offer = self.sender.call("POST", "/api/v1/offers", body)
        assert status == 201, offer
        return dict(offer)

    def receive(self, offer: dict[str, Any]) -> str:
        """Start a receive with the node's token (as `receive --node` does): the job id."""
        out = self.base / "incoming" / offer["offer_id"][:8]
        status, body = self.receiver.call(
            "POST",
            "/api/v1/receive",
            {"code": offer["code"], "out": str(out), "from": [self.sender.address]},
        )
        assert status == 202, body
        return str(body["job"])

    def transfer(self, job: str) -> dict[str, Any]:
        status, t = self.receiver.call("GET", f"/api/v1/transfers/{job}")
        assert status == 200, t
        return dict(t)

    def offer_view(self, offer_id: str) -> dict[str, Any]:
        status, o = self.sender.call("GET", f"/api/v1/offers/{offer_id}")
        assert status == 200, o
        return dict(o)

    def wait_transfer(self, job: str, state: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            t = self.transfer(job)
            if t["state"] == state:
                return t
            assert t["state"] not in ("failed", "cancelled", "complete"), t
            assert time.monotonic() < deadline, f"transfer stuck in {t['state']}"
            time.sleep(0.1)

    def wait_offer(self, offer_id: str, state: str, job: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            o = self.offer_view(offer_id)
            if o["state"] == state:
                return o
            assert time.monotonic() < deadline, (
                f"offer stuck in {o['state']}: {o}\n{self.logs(job)}"
            )
            time.sleep(0.1)

    def logs(self, job: str = "") -> str:
        """The end of both nodes' logs (and the receive's events), to tell what happened when
        a wait times out."""
        text = "\n".join(
            f"-- {n.name}:\n" + (n.data_dir / "serve.log").read_text()[-1500:]
            for n in (self.sender, self.receiver)
        )
        if job:
            _, body = self.receiver.call("GET", f"/api/v1/jobs/{job}/events?after=0&wait=0")
            text += f"\n-- receive job events:\n{body}"
        return text

    def wait_for_consent_wait(self, job: str) -> None:
        """Until the receive is paired, has the manifest and hears that consent is awaited."""
        deadline = time.monotonic() + WAIT_S
        while True:
            status, body = self.receiver.call("GET", f"/api/v1/jobs/{job}/events?after=0&wait=1")
            assert status == 200, body
            events = body["events"]
            if any(
                e["event"] == "status" and e.get("state") == "waiting-for-consent" for e in events
            ):
                return
            assert not body["done"], events
            assert time.monotonic() < deadline, events
            time.sleep(0.1)

    def audit(self, node: Node, ref: str) -> list[dict[str, Any]]:
        status, body = node.call("GET", f"/api/v1/audit?offer={ref}")
        assert status == 200, body
        return list(body["records"])

    def clean_up(self, offer_id: str | None, job: str | None) -> None:
        """Leave nothing running: cancel the receive and the offer if they are still live."""
        with contextlib.suppress(Exception):
            if job is not None:
                self.receiver.call("POST", f"/api/v1/transfers/{job}/cancel")
        with contextlib.suppress(Exception):
            if offer_id is not None:
                self.sender.call("DELETE", f"/api/v1/offers/{offer_id}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, web_study: Path) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("cancel-receive")
    # as web_nodes: policy 'none' on the node, each offer here asks for the patient's consent
    sender = spawn(SENDER_NAME, base / "sender", "--consent-policy", "none")
    try:
        receiver = spawn(RECEIVER_NAME, base / "receiver", "--consent-policy", "none")
        try:
            receiver.add_user("rad", "receiver")
            receiver.add_user(CLERK, "sender")
            yield Env(sender, receiver, web_study, base)
        finally:
            stop(receiver)
    finally:
        stop(sender)


def assert_cancelled_everywhere(env: Env, job: str, offer_id: str, user: str) -> None:
    """The receive ended for good on this node and the sending node's offer ended with it."""
    t = env.transfer(job)
    assert t["state"] == "cancelled", t
    assert t["finished"], t
    assert t.get("resume_id") is None, t  # the resume ticket is forgotten
    if t.get("staging"):
        assert not Path(t["staging"]).exists(), t
    assert not list(Path(t["out_dir"]).rglob("*.dcm")), t  # nothing was sent before consent
    # no resume, and a second cancel has nothing to cancel
    status, body = env.receiver.call("POST", "/api/v1/receive/resume", {"job": job})
    assert status == 400, body
    status, body = env.receiver.call("POST", f"/api/v1/transfers/{job}/cancel")
    assert status == 409 and body["error"] == "not-cancellable", body
    cancels = [r for r in env.audit(env.receiver, job) if r["action"] == "transfer-cancelled"]
    assert len(cancels) == 1, cancels
    assert cancels[0]["outcome"] == "ok" and cancels[0]["detail"]["user"] == user, cancels

    # the sender was told (sealed ERROR receiver-cancelled): its offer ends, naming who did it
    o = env.wait_offer(offer_id, "cancelled", job)
    assert RECEIVER_NAME in o["error"], o
    assert "cancelled the transfer on their side" in o["error"], o
    by_receiver = [
        r
        for r in env.audit(env.sender, offer_id)
        if r["action"] == "transfer-cancelled" and r["outcome"] == "by-receiver"
    ]
    assert len(by_receiver) == 1, env.audit(env.sender, offer_id)


def test_the_receive_page_cancels_a_running_receive_after_confirming(
    browser: Any, env: Env
) -> None:
    offer = env.offer()
    job: str | None = None
    page = new_page(browser, env.receiver)
    try:
        dialogs: list[tuple[str, str]] = []
        cancel_posts: list[str] = []
        page.on("dialog", lambda d: dialogs.append((d.type, d.message)))
        page.on(
            "request",
            lambda r: cancel_posts.append(r.url) if r.url.endswith("/cancel") else None,
        )
        sign_in(page, "rad", next_path="/receive")
        assert page.locator("#cancel-transfer").is_hidden()  # nothing to cancel yet
        page.fill("#code", offer["code"])
        page.fill("#from", env.sender.address)
        page.click("#receive-code")
        page.wait_for_selector("#transfer:not([hidden])")
        page.wait_for_function(
            "t => document.querySelector('#state').textContent.includes(t)",
            arg=WAITING_FOR_CONSENT,
            timeout=WAIT_MS,
        )
        job = page.get_attribute("#transfer", "data-job")
        assert job
        before = env.transfer(job)
        assert before["state"] == "receiving", before
        assert before.get("resume_id"), before  # a ticket to resume with, until cancelled
        button = page.locator("#cancel-transfer")
        assert button.is_visible() and button.is_enabled()
        assert button.inner_text() == "Cancel transfer"

        # -- dismissing the confirm cancels nothing -------------------------------------------
        page.once("dialog", lambda d: d.dismiss())
        button.click()
        page.evaluate("() => new Promise(r => setTimeout(r, 500))")  # any POST would be sent
        assert len(dialogs) == 1 and dialogs[0][0] == "confirm", dialogs
        assert "Cancel this transfer?" in dialogs[0][1], dialogs
        assert cancel_posts == []
        assert WAITING_FOR_CONSENT in page.inner_text("#state")
        assert button.is_visible() and button.is_enabled()
        assert env.transfer(job)["state"] == "receiving"
        assert env.offer_view(offer["offer_id"])["state"] == "paired"  # still connected
        assert not [r for r in env.audit(env.receiver, job) if r["action"] == "transfer-cancelled"]

        # -- accepting it cancels: the page, this node and the sending node say so ------------
        page.once("dialog", lambda d: d.accept())
        with page.expect_response(
            lambda r: r.url.endswith(f"/api/v1/transfers/{job}/cancel"), timeout=WAIT_MS
        ) as answer:
            button.click()
        res = answer.value
        assert res.request.method == "POST"
        assert res.request.headers.get("x-csrf-token")
        assert res.status == 200 and res.json() == {"cancelled": True}
        page.wait_for_function(
            "t => document.querySelector('#state').textContent === t",
            arg=CANCELLED_ON_PAGE,
            timeout=WAIT_MS,
        )
        assert len(dialogs) == 2
        assert "message error" in (page.get_attribute("#state", "class") or "")
        page.wait_for_selector("#cancel-transfer", state="hidden")
        assert page.locator("#ways").is_visible()  # ready for another code
        assert page.locator("#message").is_hidden()  # no error besides the state line
        assert_cancelled_everywhere(env, job, offer["offer_id"], "rad")
    finally:
        page.context.close()
        env.clean_up(offer["offer_id"], job)


def test_the_transfers_page_cancels_a_waiting_receive_but_offers_no_cancel_when_complete(
    browser: Any, env: Env
) -> None:
    # a completed receive (no consent needed): its row must not offer Cancel
    done = env.receive(env.offer(consent="none"))
    env.wait_transfer(done, "complete")
    offer = env.offer()
    job: str | None = None
    page = new_page(browser, env.receiver)
    try:
        job = env.receive(offer)
        env.wait_for_consent_wait(job)
        assert env.transfer(job)["state"] == "receiving"

        sign_in(page, "rad", next_path="/transfers")
        row = page.locator(f'#received tr[data-job="{job}"]')
        row.wait_for()
        state_cell = row.locator("td:nth-child(2)")
        assert state_cell.inner_text().splitlines()[0] == "receiving"
        assert row.locator("button.cancel").count() == 1
        assert row.locator("button.cancel").inner_text() == "Cancel"
        complete_row = page.locator(f'#received tr[data-job="{done}"]')
        assert complete_row.locator("td:nth-child(2)").inner_text().startswith("complete")
        assert complete_row.locator("button.cancel").count() == 0

        # dismissing the confirm changes nothing
        page.once("dialog", lambda d: d.dismiss())
        row.locator("button.cancel").click()
        page.evaluate("() => new Promise(r => setTimeout(r, 500))")
        assert row.locator("button.cancel").count() == 1
        assert state_cell.inner_text().splitlines()[0] == "receiving"
        assert env.transfer(job)["state"] == "receiving"
        assert env.offer_view(offer["offer_id"])["state"] == "paired"  # still connected

        page.once("dialog", lambda d: d.accept())
        with page.expect_response(
            lambda r: r.url.endswith(f"/api/v1/transfers/{job}/cancel"), timeout=WAIT_MS
        ) as answer:
            row.locator("button.cancel").click()
        assert answer.value.status == 200 and answer.value.json() == {"cancelled": True}
        page.wait_for_function(
            """job => {
              const row = document.querySelector(`#received tr[data-job="${job}"]`);
              return row && !row.querySelector('button.cancel')
                && row.children[1].textContent.startsWith('cancelled');
            }""",
            arg=job,
            timeout=WAIT_MS,
        )
        assert state_cell.inner_text().splitlines()[0] == "cancelled"
        assert row.locator("button.cancel").count() == 0
        assert page.locator("#message").is_hidden()
        assert_cancelled_everywhere(env, job, offer["offer_id"], "rad")

        # a fresh look at the page agrees, and still offers no Cancel
        page.reload()
        row.wait_for()
        assert state_cell.inner_text().splitlines()[0] == "cancelled"
        assert row.locator("button.cancel").count() == 0
    finally:
        page.context.close()
        env.clean_up(offer["offer_id"], job)


CANCEL_FETCH = """async ([job, withCsrf]) => {
  const session = await (await fetch('/api/v1/session')).json();
  const headers = withCsrf ? {'X-CSRF-Token': session.csrf} : {};
  const r = await fetch(`/api/v1/transfers/${encodeURIComponent(job)}/cancel`,
                        {method: 'POST', headers});
  return {status: r.status, body: await r.json(), role: session.role};
}"""


def test_only_a_receiving_role_with_the_csrf_token_may_cancel(browser: Any, env: Env) -> None:
    offer = env.offer()
    job: str | None = None
    clerk = new_page(browser, env.receiver)
    rad = new_page(browser, env.receiver)
    try:
        job = env.receive(offer)
        env.wait_for_consent_wait(job)

        sign_in(clerk, CLERK, next_path="/transfers")
        # the page offers a sending role no button it may not use
        row = clerk.locator(f'#received tr[data-job="{job}"]')
        row.wait_for(timeout=WAIT_MS)
        assert row.locator("button.details").count() == 1
        assert row.locator("button.cancel").count() == 0
        res = clerk.evaluate(CANCEL_FETCH, [job, True])
        assert res["role"] == "sender"
        assert res["status"] == 403 and res["body"]["error"] == "forbidden", res

        # a receiving member of staff still needs the session's CSRF token
        sign_in(rad, "rad", next_path="/transfers")
        res = rad.evaluate(CANCEL_FETCH, [job, False])
        assert res["role"] == "receiver"
        assert res["status"] == 403 and res["body"]["error"] == "csrf", res

        # nothing was cancelled: still waiting for consent on both sides, nothing audited
        t = env.transfer(job)
        assert t["state"] == "receiving", t
        status, body = env.receiver.call("GET", f"/api/v1/jobs/{job}/events?after=0&wait=0")
        assert status == 200 and not body["done"], body
        assert env.offer_view(offer["offer_id"])["state"] == "paired"  # still connected
        assert not [r for r in env.audit(env.receiver, job) if r["action"] == "transfer-cancelled"]

        # and the refusal was not a broken call: with the token and the role it goes through
        res = rad.evaluate(CANCEL_FETCH, [job, True])
        assert res["status"] == 200 and res["body"] == {"cancelled": True}, res
        assert_cancelled_everywhere(env, job, offer["offer_id"], "rad")
    finally:
        clerk.context.close()
        rad.context.close()
        env.clean_up(offer["offer_id"], job)
