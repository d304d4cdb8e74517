"""Command line: argument parsing, logging set-up, and the human and --json front ends.

Exit status: 0 only when the whole job succeeded (for send/receive: every instance verified and
the receipt signed); 1 when the transfer failed; 2 for usage, code or input problems; 130 when
interrupted. Errors are one line saying what happened and what to do; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from p2pshare import __version__, cli_audit, cli_pacs, cli_users, relay
from p2pshare.client import ApiError, NodeClient, connect_node
from p2pshare.config import DEFAULT_PORT, NodeConfig, default_data_dir, parse_duration
from p2pshare.discovery import browse
from p2pshare.errors import (
    CodeError,
    ConfigError,
    InputError,
    P2PShareError,
    StudyChoiceError,
)
from p2pshare.transfer.relay_client import normalise as normalise_relay

log = logging.getLogger("p2pshare")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SHOW_SKIPPED = 10


def _saved_name(data_dir: Path, given: str | None) -> str:
    """The node's display name: given once, remembered in the data directory."""
    path = data_dir / "name"
    if given:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(given + "\n")
        return given
    if path.exists():
        return path.read_text().strip()
    return socket.gethostname()


def _node_config(args: argparse.Namespace, default_port: int) -> NodeConfig:
    data_dir = Path(args.data_dir).expanduser()
    return NodeConfig(
        data_dir=data_dir,
        name=_saved_name(data_dir, args.name),
        host=args.host,
        port=args.port if args.port is not None else default_port,
        advertise=tuple(args.advertise or ()),
        chunk_size=args.chunk_size,
        discovery=args.discovery,
        relay=normalise_relay(args.relay) if args.relay else "",
        idle_timeout_s=args.idle_timeout,
        **_consent_config(args),
        **cli_pacs.node_fields(args),
    )


def _consent_config(args: argparse.Namespace) -> dict[str, Any]:
    """Node-level consent settings (serve), or the policy a temporary node applies (send)."""
    out: dict[str, Any] = {}
    policy = getattr(args, "consent_policy", None) or getattr(args, "consent", None)
    if policy:
        out["consent_policy"] = policy
    for key in (
        "privacy_contact",
        "privacy_webhook",
        "public_url",
        "break_glass_minutes",
        "reconnect_attempts",
        "reconnect_delay_s",
    ):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


class Output:
    """Human lines on a terminal (with a progress bar) or one JSON object per line."""

    def __init__(self, as_json: bool, stream: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.stream = stream
        self._bar: Any = None

    def json(self, obj: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(obj, sort_keys=True), file=self.stream, flush=True)

    def say(self, text: str) -> None:
        if not self.as_json:
            self.close_bar()
            print(text, file=self.stream, flush=True)

    def progress(self, done: int, total: int, unit_label: str) -> None:
        if self.as_json or not sys.stderr.isatty():
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc=unit_label,
                file=sys.stderr,
                leave=False,
            )
        self._bar.update(done - self._bar.n)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _print_qr(out: Output, uri: str) -> None:
    import qrcode

    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(uri)
    buf = io.StringIO()
    qr.print_ascii(out=buf, invert=True)
    out.say(buf.getvalue().rstrip("\n"))


def save_qr(uri: str, png: str | None, svg: str | None) -> None:
    import qrcode
    import qrcode.image.svg

    if png:
        qrcode.make(uri, box_size=10, border=4).save(png)
    if svg:
        qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathImage).save(svg)


async def _watch(
    client: NodeClient, job: str, out: Output, role: str, seen: set[str] | None = None
) -> int:
    """Follow a job's events to the end; returns the exit status. ``seen`` collects the kinds
    of event that came."""
    async for e in client.events(job):
        out.json({k: v for k, v in e.items() if k != "seq"} | {"type": e["event"]})
        kind = e["event"]
        if seen is not None:
            seen.add(kind)
        if kind == "pairing":
            out.say("A receiver is pairing…")
        elif kind == "wrong-code":
            out.say(f"A receiver typed a wrong code ({e['tries_left']} tries left).")
        elif kind == "peer-refused":
            out.say(f"Refused a receiver: {e['message']}")
        elif kind == "paired":
            word = "to" if role == "send" else "from"
            first = " (first contact: identity pinned)" if e.get("first_contact") else ""
            out.say(f"Paired {word} {e['peer']} [{e['fingerprint']}]{first}")
        elif kind == "manifest":
            series = ", ".join(
                f"{s['description'] or s['modality'] or 'series'} ({s['instances']})"
                for s in e.get("series", [])
            )
            out.say(
                f"Incoming: {e.get('study_description') or 'study'} {e.get('study_date', '')} — "
                f"{e['instances']} instances, {_fmt_bytes(e['bytes'])}; series: {series}"
            )
        elif kind == "status":
            state = e.get("state")
            if state == "waiting-for-consent":
                out.say("Sender: waiting for the patient's consent; no images are sent until then.")
            else:
                out.say(f"Sender: {state}")
        elif kind == "consent-pending" and role == "send":
            out.say("Waiting for the patient's consent on their phone…")
        elif kind == "consent-viewed":
            out.say("The patient opened the consent page.")
        elif kind == "consent-dob-mismatch":
            out.say(f"Consent page: date of birth did not match ({e['tries_left']} tries left).")
        elif kind == "consent-link-dead":
            out.say(f"Consent link closed: {e['reason']}.")
        elif kind == "consent-approved":
            out.say(f"Consent: approved by the {e.get('by', 'patient')}.")
        elif kind == "consent-revoked":
            out.say("Consent: the patient REVOKED their approval.")
        elif kind == "break-glass":
            out.say(
                f"*** BREAK-GLASS by {e['clinician']}: {e['reason']} (valid until "
                f"{time.strftime('%H:%M', time.localtime(e['valid_until']))}) — the privacy "
                f"contact is notified ***"
            )
        elif kind == "consent":
            at = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["at"]))
            text = e.get("text", "")
            if e.get("decision") == "break-glass":
                out.say(f"*** {text} (at {at}) ***")
            else:
                out.say(f"Consent: {text} at {at}.")
        elif kind == "streaming":
            out.say("Streaming…")
        elif kind == "interrupted":
            out.close_bar()
            out.say(f"Connection lost ({e.get('message', '')}); waiting for the receiver to "
                    f"reconnect…")  # fmt: skip
        elif kind == "reconnecting":
            out.close_bar()
            out.say(f"Connection lost: {e['reason']}. Reconnecting in {e['delay_s']:g} s "
                    f"(attempt {e['attempt']})…")  # fmt: skip
        elif kind == "resumed":
            out.say("Reconnected: resuming from what already arrived.")
        elif kind == "resuming":
            out.say(
                f"Resuming: {e['files_verified']} of {e['files_total']} instances already "
                f"in place, {_fmt_bytes(e['bytes_held'])} held."
            )
        elif kind == "progress":
            done = e.get("bytes_sent", e.get("bytes_received", 0))
            out.progress(
                done, e.get("bytes_total", 0), "sending" if role == "send" else "receiving"
            )
        elif kind == "complete":
            out.close_bar()
            r = e["receipt"]
            if role == "send":
                out.say(
                    f"Delivered and verified: {r['instances']} instances, {_fmt_bytes(r['bytes'])}. "
                    f"Receipt signed by {e.get('peer')} [{r['receiver']}] for manifest "
                    f"{r['manifest_sha256']}"
                )
            else:
                out.say(
                    f"Received and verified: {r['instances']} instances, {_fmt_bytes(r['bytes'])} "
                    f"in {e.get('out_dir')}. Receipt for manifest {r['manifest_sha256']} signed "
                    f"and returned to the sender."
                )
            return EXIT_OK
        elif kind == "error":
            out.close_bar()
            out.say(f"Error: {e['message']}")
            code = e.get("code", "")
            return EXIT_USAGE if code.startswith(("code", "offer-")) else EXIT_FAILED
    return EXIT_FAILED


async def cmd_send(args: argparse.Namespace, out: Output) -> int:
    expires = parse_duration(args.expires) if args.expires else None
    local = None if args.node else _node_config(args, default_port=0)
    async with connect_node(args.node, Path(args.data_dir).expanduser(), local) as client:
        try:
            glass = (
                {"clinician": args.break_glass_by, "reason": args.reason or ""}
                if args.break_glass_by
                else None
            )
            offer = await client.create_offer(
                args.path,
                args.study,
                expires,
                consent=args.consent,
                destination=args.to,
                break_glass=glass,
            )
        except StudyChoiceError as exc:
            out.json(
                {"type": "error", "code": exc.code, "message": exc.message, "studies": exc.studies}
            )
            out.say(f"Error: {exc.message}")
            for s in exc.studies:
                out.say(
                    f"  --study {s['uid']}  {s.get('date', '')} {s.get('description', '')} "
                    f"({s.get('instances', '?')} instances)"
                )
            return EXIT_USAGE
        save_qr(offer["uri"], args.qr_png, args.qr_svg)
        out.json({"type": "offer"} | offer)
        study = offer["study"]
        if not out.as_json:
            _print_qr(out, offer["uri"])
        out.say(
            f"Offering: {study['study_description'] or 'study'} — {study['instances']} "
            f"instances, {_fmt_bytes(study['bytes'])}"
        )
        if offer["skipped"] or offer["duplicates"]:
            reasons: dict[str, int] = {}
            for s in offer["skipped"]:
                key = s["reason"].split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
            detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            dup = f"; {offer['duplicates']} duplicate(s) ignored" if offer["duplicates"] else ""
            out.say(f"Skipped {len(offer['skipped'])} file(s): {detail}{dup}")
            for s in offer["skipped"][:SHOW_SKIPPED]:
                out.say(f"  {s['name']}: {s['reason']}")
            if len(offer["skipped"]) > SHOW_SKIPPED:
                out.say(
                    f"  … and {len(offer['skipped']) - SHOW_SKIPPED} more (all listed with --json)"
                )
        out.say(f"From: {offer['sender']} [{offer['fingerprint']}]")
        out.say(f"Spoken code (read it out): {offer['code']}")
        out.say(f"Sender address: {', '.join(offer['addresses'])}")
        out.say(f"QR link: {offer['uri']}")
        _say_consent(out, offer.get("consent") or {})
        out.say(
            f"Expires at {time.strftime('%H:%M:%S', time.localtime(offer['expires']))}. "
            f"Waiting for the receiver…"
        )
        args.interrupted = "Interrupted; the offer was cancelled."
        try:
            return await _watch(client, offer["offer_id"], out, "send")
        except asyncio.CancelledError:
            await client.cancel_offer(offer["offer_id"])
            raise


def _say_consent(out: Output, c: dict[str, Any]) -> None:
    if c.get("link"):
        out.say("")
        out.say("PATIENT CONSENT — let the patient (or their representative) scan this with their")
        out.say("phone, or open the link on it. No image is sent before they approve:")
        if not out.as_json:
            _print_qr(out, c["link"])
        out.say(f"Consent link (give it only to the patient): {c['link']}")
    elif c.get("state") == "not-required":
        out.say("Consent policy 'none': no consent is asked (tests and demos only).")
    if c.get("state") == "break-glass":
        out.say(f"*** BREAK-GLASS authorised until {time.strftime('%H:%M', time.localtime(c['valid_until']))} ***")


async def cmd_break_glass(args: argparse.Namespace, out: Output) -> int:
    async with connect_node(args.node, Path(args.data_dir).expanduser(), None) as client:
        view = await client.break_glass(args.offer, args.by, args.reason, args.minutes)
    out.json({"type": "break-glass"} | view)
    until = time.strftime("%H:%M", time.localtime(view["valid_until"]))
    out.say(f"*** BREAK-GLASS recorded for offer {args.offer}, valid until {until}. ***")
    out.say("The privacy contact has been notified; this is in the audit log.")
    return EXIT_OK


async def cmd_receive(args: argparse.Namespace, out: Output) -> int:
    local = None if args.node else _node_config(args, default_port=0)
    async with connect_node(args.node, Path(args.data_dir).expanduser(), local) as client:
        if args.resume:
            job = await client.resume(args.resume)
        else:
            job = await client.receive(args.code, args.out, args.sources or [])
        out.json({"type": "receiving", "job": job})
        out.say(f"Transfer job {job} (to resume after an interruption: --resume {job})")
        if args.node:
            args.interrupted = (
                "Interrupted; the transfer was cancelled on the node and what had not been "
                "verified was deleted."
            )
        else:
            args.interrupted = (
                f"Interrupted. If the study had started to arrive, what arrived is kept: go on "
                f"with p2pshare receive --resume {job} (while the sender's offer lasts)"
            )
        seen: set[str] = set()
        try:
            status = await _watch(client, job, out, "receive", seen)
        except asyncio.CancelledError:
            if args.node:
                try:
                    await client.cancel_receive(job)
                except P2PShareError as exc:
                    args.interrupted = (
                        f"Interrupted; the node could not be asked to cancel the transfer "
                        f"({exc.message}): it goes on there. Cancel it on the node's transfers "
                        f"page if it is not wanted."
                    )
            raise
        if status == EXIT_OK and not args.node and "receipt-unconfirmed" in seen:
            await _resend_before_exit(client, job, out)
        return status


#: A `receive` without --node waits this long for its node to send a lost receipt again (its
#: first two tries) before the node stops with the command.
RESEND_WAIT_S = 12.0


async def _resend_before_exit(client: NodeClient, job: str, out: Output) -> None:
    """The connection ended before the sender confirmed the receipt, and this command's node
    stops with it: give the node's resend its first tries, and say how it went."""
    out.say("The connection ended before the sender confirmed the receipt; sending it again…")
    outcome = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESEND_WAIT_S
    while not outcome and loop.time() < deadline:
        await asyncio.sleep(0.2)
        events = (await client._call("GET", f"/api/v1/jobs/{job}/events?after=0&wait=0"))["events"]
        outcome = next((e["outcome"] for e in events if e["event"] == "receipt-resent"), "")
    out.json({"type": "receipt-resent", "outcome": outcome or "unreachable"})
    if outcome == "ok":
        out.say("The sender has the receipt now.")
    elif outcome == "refused":
        out.say("The sender already had the receipt.")
    else:
        out.say(
            "The sending node could not be reached to send the receipt again: it may show the "
            "transfer as interrupted. The study here is complete; run `p2pshare serve` to keep "
            "a node that retries."
        )


async def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    from p2pshare.node.app import start

    cfg = _node_config(args, default_port=DEFAULT_PORT)
    runner, app = await start(cfg)
    from p2pshare.node.keys import engine_key

    fp = app[engine_key].identity.fingerprint
    addrs = ", ".join(f"{h}:{p}" for h, p in ((a[0], a[1]) for a in runner.addresses))
    out.say(f"{cfg.name} [{fp}] serving on {addrs} (data: {cfg.data_dir})")
    out.json(
        {
            "type": "serving",
            "name": cfg.name,
            "fingerprint": fp,
            "addresses": [f"{a[0]}:{a[1]}" for a in runner.addresses],
        }
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return EXIT_OK


async def cmd_peers(args: argparse.Namespace, out: Output) -> int:
    from p2pshare.store import Store

    data_dir = Path(args.data_dir).expanduser()
    if args.node:
        async with connect_node(args.node, data_dir, None) as client:
            if args.action == "forget":
                await client.forget_peer(args.peer)
                out.say(f"Forgot {args.peer}; its next key will be pinned on first contact.")
                return EXIT_OK
            peers = await client.peers()
            seen_lan = (await client._call("GET", "/api/v1/discovered"))["nodes"]
    else:
        store = Store(data_dir)
        try:
            if args.action == "forget":
                if not store.forget_peer(args.peer):
                    raise InputError(f"no pinned institution is called '{args.peer}'")
                store.audit.append(int(time.time()), "peer-forgotten", name=args.peer)
                out.say(f"Forgot {args.peer}; its next key will be pinned on first contact.")
                return EXIT_OK
            peers = store.list_peers()
        finally:
            store.close()
        seen_lan = [d.to_json() for d in await browse(args.host, args.browse)]
    return _print_peers(out, peers, seen_lan)


def _print_peers(out: Output, peers: list[dict[str, Any]], lan: list[dict[str, Any]]) -> int:
    """Pinned institutions and nodes seen on the LAN, with a column saying which each is."""
    on_lan = {(d["name"], d["fingerprint"]): d for d in lan}
    for p in peers:
        d = on_lan.pop((p["name"], p["fingerprint"]), None)
        where = "pinned+lan" if d else "pinned"
        out.json({"type": "peer", "source": where, "addresses": d["addresses"] if d else []} | p)
        seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["last_seen"]))
        at = ", ".join(d["addresses"]) if d else p["last_address"] or "?"
        out.say(f"{where:<11} {p['name']}  [{p['fingerprint']}]  last seen {seen} at {at}")
    for d in on_lan.values():
        out.json({"type": "peer", "source": "lan"} | d)
        out.say(
            f"{'lan':<11} {d['name']}  [{d['fingerprint']}]  at {', '.join(d['addresses'])} "
            f"(advertised, not verified)"
        )
    if not peers and not on_lan:
        out.say("No pinned institutions yet, and no node seen on the LAN.")
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from p2pshare.demo import run_demo

    return await run_demo(out, seed=args.seed, workdir=args.workdir)


def _add_node_args(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    p.add_argument(
        "--data-dir",
        default=str(default_data_dir()),
        help="the node's data directory (identity, database, API token)",
    )
    p.add_argument("--name", help="this institution's display name (remembered)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port to listen on (serve: {DEFAULT_PORT}; send/receive: any free port)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1024 * 1024,
        metavar="BYTES",
        help="bytes per encrypted chunk when sending (4096 to 4194304; default 1 MiB)",
    )
    p.add_argument(
        "--advertise",
        action="append",
        metavar="HOST:PORT",
        help="address receivers should use to reach this node (repeatable)",
    )
    p.add_argument(
        "--relay",
        metavar="ws://HOST:PORT",
        help="relay to offer QR transfers through as well (see docs/relay.md)",
    )
    p.add_argument(
        "--no-discovery",
        dest="discovery",
        action="store_false",
        help="do not advertise this node or look for others on the LAN (mDNS)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="drop a peer that sends nothing or stops reading for this long (default 120)",
    )
    if not serve:
        p.add_argument(
            "--node", metavar="URL", help="drive a running node instead of a temporary one"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pshare",
        description="Move a DICOM study directly and end-to-end encrypted to another hospital.",
    )
    parser.add_argument("--version", action="version", version=f"p2pshare {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run a node: peer endpoint and API")
    _add_node_args(p, serve=True)
    cli_pacs.add_serve_args(p)
    p.add_argument(
        "--consent-policy",
        choices=["patient", "patient-or-break-glass", "none"],
        help="default consent policy for offers (default: patient)",
    )
    p.add_argument("--break-glass-minutes", type=int, help="how long a break-glass lasts (60)")
    p.add_argument("--privacy-contact", metavar="ADDRESS", help="told of every break-glass")
    p.add_argument("--privacy-webhook", metavar="URL", help="POST break-glass notifications here")
    p.add_argument(
        "--public-url", metavar="URL", help="base URL patients' phones use to reach this node"
    )
    p.add_argument(
        "--reconnect-attempts",
        type=int,
        help="after a cut, reconnect this many times (with backoff) before waiting for "
        "`receive --resume` (default 8)",
    )
    p.add_argument(
        "--reconnect-delay",
        dest="reconnect_delay_s",
        type=float,
        help="first reconnection delay in seconds, doubling up to 30 (default 0.5)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("send", help="offer a study (folder or .zip) and send it when paired")
    p.add_argument("path", help="folder (searched recursively) or .zip of DICOM files")
    p.add_argument("--study", metavar="UID", help="which study, when the input holds several")
    p.add_argument("--expires", help="offer lifetime, e.g. 15m (default), 90s, 2h")
    p.add_argument("--qr-png", metavar="FILE", help="also save the QR code as PNG")
    p.add_argument("--qr-svg", metavar="FILE", help="also save the QR code as SVG")
    p.add_argument(
        "--consent",
        choices=["patient", "patient-or-break-glass", "none"],
        help="consent policy for this offer (default: the node's, normally 'patient')",
    )
    p.add_argument("--to", metavar="INSTITUTION", help="intended destination, shown to the patient")
    p.add_argument(
        "--break-glass-by",
        metavar="CLINICIAN",
        help="authorise without the patient (they cannot decide): your name and role",
    )
    p.add_argument("--reason", help="break-glass reason: a full sentence (required with it)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_node_args(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("receive", help="receive a study with a spoken code or QR link")
    p.add_argument(
        "code", nargs="?", help="the spoken code (7-word-word-word-word) or the p2pshare:// link"
    )
    p.add_argument("--out", help="destination folder")
    p.add_argument(
        "--resume",
        metavar="JOB",
        help="carry on an interrupted transfer (its job id) from what already arrived",
    )
    p.add_argument(
        "--from",
        dest="sources",
        action="append",
        metavar="HOST:PORT|NAME",
        help="the sending node's address, or the name of a pinned institution",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_node_args(p)
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser(
        "break-glass", help="authorise a live offer without the patient (audited, notified)"
    )
    p.add_argument("offer", help="the offer id")
    p.add_argument("--by", required=True, metavar="CLINICIAN", help="your name and role")
    p.add_argument("--reason", required=True, help="why the patient cannot decide (a sentence)")
    p.add_argument("--minutes", type=int, help="how long it lasts (default: the node's, 60)")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--node", metavar="URL", required=True, help="the node holding the offer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_break_glass)

    p = sub.add_parser("peers", help="list pinned institutions, or forget one to re-trust it")
    p.add_argument("action", nargs="?", choices=["list", "forget"], default="list")
    p.add_argument("peer", nargs="?", help="institution name (for forget)")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--node", metavar="URL")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--host", default="127.0.0.1", help="without --node: look for nodes on this interface"
    )
    p.add_argument(
        "--browse", type=float, default=2.0, metavar="S", help="without --node: look this long"
    )
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("demo", help="two local nodes, one synthetic CT study, end to end")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    cli_users.register(sub)
    cli_audit.register(sub)
    cli_pacs.register(sub)
    relay.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    if args.command == "serve":
        level = min(level, logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    out = Output(bool(args.json))
    if args.command == "receive" and not args.resume and not (args.code and args.out):
        print("Error: give the code (or QR link) and --out, or --resume JOB", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "peers" and args.action == "forget" and not args.peer:
        print("Error: name the institution to forget", file=sys.stderr)
        return EXIT_USAGE
    try:
        status: int = asyncio.run(args.func(args, out))
        return status
    except KeyboardInterrupt:
        out.close_bar()
        print(getattr(args, "interrupted", "Interrupted."), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CodeError, ConfigError, InputError) as exc:
        return _fail(out, exc, EXIT_USAGE)
    except ApiError as exc:
        return _fail(
            out, exc, EXIT_USAGE if exc.code.startswith(("code", "offer-")) else EXIT_FAILED
        )
    except P2PShareError as exc:
        return _fail(out, exc, EXIT_FAILED)


def _fail(out: Output, exc: P2PShareError, status: int) -> int:
    out.close_bar()
    if out.as_json:
        out.json({"type": "error", "code": exc.code, "message": exc.message})
    else:
        print(f"Error: {exc.message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
