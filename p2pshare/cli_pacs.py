"""Command line for the PACS side: ``import``, ``studies``, ``export`` and the ``serve`` options.

``import`` and ``studies`` work on the node's library directly (``--data-dir``) or through a
running node (``--node URL``); ``export`` always asks a running node, because the PACS it
exports to is that node's configuration.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from p2pshare.client import ApiError, NodeClient, connect_node, read_token
from p2pshare.config import DEFAULT_MIN_FREE_BYTES as MIN_FREE
from p2pshare.config import default_data_dir
from p2pshare.errors import ConfigError

if TYPE_CHECKING:
    from p2pshare.cli import Output

__all__ = ["add_serve_args", "node_fields", "register"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # as in p2pshare.cli
SHOW_SKIPPED = 10


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The ``serve`` options of the DICOM listener, export targets and reconciliation rules."""
    g = p.add_argument_group("PACS")
    g.add_argument("--dicom-port", type=int, metavar="PORT",
                   help="run a DICOM Storage SCP on this port (off unless given)")
    g.add_argument("--ae-title", default="P2PSHARE", metavar="AE",
                   help="this node's AE title (default P2PSHARE)")
    g.add_argument("--dicom-allow", action="append", metavar="AE",
                   help="only these calling AE titles may push studies (repeatable)")
    g.add_argument("--dicom-quiet", type=float, default=10.0, metavar="SECONDS",
                   help="a pushed study is complete after this long without a new image (10)")
    g.add_argument("--pacs", metavar="AE@HOST:PORT", help="the local PACS for C-STORE export")
    g.add_argument("--stow", metavar="URL", help="the DICOMweb base URL for STOW-RS export")
    g.add_argument("--auto-export", action="store_true",
                   help="export every received study at once (received Patient ID, issuer = "
                        "the sender; see docs/pacs.md)")
    g.add_argument("--accession-prefix", default="", metavar="TEXT",
                   help="prefix foreign accession numbers with TEXT when no local one is given")


def node_fields(args: argparse.Namespace) -> dict[str, Any]:
    """NodeConfig fields from the ``serve`` options (none for commands without them)."""
    if not hasattr(args, "dicom_port"):
        return {}
    from p2pshare.pacs.export import PacsTarget, check_ae_title

    if args.dicom_port is not None and not 0 <= args.dicom_port <= 65535:
        raise ConfigError(f"--dicom-port {args.dicom_port} is out of range")
    if args.dicom_quiet <= 0:
        raise ConfigError("--dicom-quiet must be a positive number of seconds")
    if args.pacs:
        PacsTarget.parse(args.pacs)
    if args.stow and not args.stow.startswith(("http://", "https://")):
        raise ConfigError(f"--stow {args.stow} is not a URL; use e.g. http://pacs:8042/dicom-web")
    if args.auto_export and not (args.pacs or args.stow):
        raise ConfigError("--auto-export needs a target: add --pacs AE@HOST:PORT or --stow URL")
    return {
        "dicom_port": args.dicom_port,
        "ae_title": check_ae_title(args.ae_title),
        "dicom_allow": tuple(check_ae_title(a) for a in args.dicom_allow or ()),
        "dicom_quiet_s": args.dicom_quiet,
        "pacs_target": args.pacs,
        "stow_url": args.stow,
        "auto_export": args.auto_export,
        "accession_prefix": args.accession_prefix,
    }


def register(sub: Any) -> None:
    p = sub.add_parser("import", help="import studies from a CD/DVD (DICOMDIR), folder or zip")
    p.add_argument("path", help="CD/DVD folder, folder (searched recursively) or .zip")
    p.add_argument("--report", metavar="FILE", help="attach this report (PDF or text)")
    _common(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("studies", help="list the studies in the node's library")
    _common(p)
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("export", help="export a received study to the local PACS, reconciled")
    p.add_argument("job", help="the receive job id (shown by `receive --json`)")
    p.add_argument("--mrn", required=True, help="the patient's local record number")
    p.add_argument("--issuer", default="", help="issuer of the local MRN")
    p.add_argument("--name", default="", help="the patient's name as the local record has it")
    p.add_argument("--accession", default="", help="local accession number")
    p.add_argument("--to", choices=["pacs", "stow"], default="pacs",
                   help="C-STORE to the node's --pacs (default) or STOW-RS to its --stow")
    _common(p)
    p.set_defaults(func=cmd_export)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=str(default_data_dir()),
                   help="the node's data directory (library, API token)")
    p.add_argument("--node", metavar="URL", help="use a running node instead of --data-dir")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


async def cmd_import(args: argparse.Namespace, out: Output) -> int:
    path = str(Path(args.path).expanduser().resolve())
    report_file = str(Path(args.report).expanduser().resolve()) if args.report else None
    if report_file and not Path(report_file).is_file():
        raise ConfigError(f"the report {args.report} does not exist")
    if args.node:
        async with _client(args) as client:
            report: dict[str, Any] = await client._call(
                "POST", "/api/v1/studies/import", {"path": path}
            )
            attached = await _attach_remote(client, report, report_file) if report_file else None
    else:
        from p2pshare.library import Library

        library = Library(Path(args.data_dir).expanduser(), min_free_bytes=MIN_FREE)
        report = await asyncio.to_thread(library.import_path, path)
        attached = None
        if report_file:
            sid = _one_study(report)
            attached = await asyncio.to_thread(library.attach_report, sid, report_file)
    out.json({"type": "import"} | report)
    _say_import(out, report)
    if attached:
        out.json({"type": "report"} | attached)
        what = "an Encapsulated PDF" if attached["kind"] == "pdf" else "a Basic Text SR"
        out.say(f"Report attached to study {attached['study_id']} as {what}.")
    return EXIT_OK if report["studies"] else EXIT_USAGE


def _one_study(report: dict[str, Any]) -> str:
    studies = report["studies"]
    if len(studies) != 1:
        raise ConfigError(
            f"--report needs exactly one imported study, but the input held {len(studies)}; "
            "import first, then attach with the study's id"
        )
    return str(studies[0]["study_id"])


async def _attach_remote(
    client: NodeClient, report: dict[str, Any], file: str
) -> dict[str, Any]:
    sid = _one_study(report)
    form = aiohttp.FormData()
    form.add_field("file", Path(file).read_bytes(), filename=Path(file).name)
    async with client.http.post(
        f"{client.base_url.rstrip('/')}/api/v1/studies/{sid}/report",
        data=form,
        headers={"Authorization": f"Bearer {client.token}"},
    ) as resp:
        data: dict[str, Any] = await resp.json(content_type=None)
        if resp.status >= 400:
            raise ApiError(str(data.get("error", "error")), str(data.get("message", "")))
        return data


def _say_import(out: Output, report: dict[str, Any]) -> None:
    studies = report["studies"]
    out.say(
        f"Imported {report['imported']} instance(s) into {len(studies)} "
        f"stud{'y' if len(studies) == 1 else 'ies'}; {report['duplicates']} duplicate(s) ignored."
    )
    for s in studies:
        out.say(f"  {s['study_id']}  +{s['added']} instances ({s['duplicates']} duplicates)")
    d = report["dicomdir"]
    if d["found"]:
        missing = len(d["missing"])
        out.say(
            f"DICOMDIR lists {d['referenced']} instance(s)"
            + (f"; {missing} of them are missing or unreadable" if missing else "; all found")
        )
    skipped = report["skipped"]
    if skipped:
        out.say(f"Skipped {len(skipped)} file(s):")
        for s in skipped[:SHOW_SKIPPED]:
            out.say(f"  {s['name']}: {s['reason']}")
        if len(skipped) > SHOW_SKIPPED:
            out.say(f"  … and {len(skipped) - SHOW_SKIPPED} more (all listed with --json)")
    if not studies:
        out.say("Error: no DICOM images found; choose the folder, disc or zip with the study")


async def cmd_studies(args: argparse.Namespace, out: Output) -> int:
    if args.node:
        async with _client(args) as client:
            studies: list[dict[str, Any]] = await client._call("GET", "/api/v1/studies")
    else:
        from p2pshare.library import Library

        studies = Library(Path(args.data_dir).expanduser()).list()
    for s in studies:
        out.json({"type": "study"} | s)
        out.say(
            f"{s['study_id']}  {s['state']:<9} {s['source']:<6} {s['study_date'] or '-':<8}  "
            f"{s['study_description'] or 'study'} ({', '.join(s['modalities'])}): "
            f"{s['instances']} instances, {_fmt_bytes(s['bytes'])}"
        )
    if not studies:
        out.say("The library holds no studies yet.")
    return EXIT_OK


async def cmd_export(args: argparse.Namespace, out: Output) -> int:
    if not args.node:
        raise ConfigError(
            "export needs the running node that received the study: add --node URL"
        )
    async with _client(args) as client:
        started = await client._call(
            "POST",
            f"/api/v1/transfers/{args.job}/export",
            {
                "target": args.to,
                "mrn": args.mrn,
                "issuer": args.issuer,
                "name": args.name,
                "accession": args.accession,
            },
        )
        export_id = started["export_id"]
        out.json({"type": "export", "export_id": export_id})
        async for e in client.events(export_id):
            out.json({k: v for k, v in e.items() if k != "seq"} | {"type": e["event"]})
            kind = e["event"]
            if kind == "exporting":
                out.say(
                    f"Exporting {e['instances']} instance(s), {_fmt_bytes(e['bytes'])} to "
                    f"{e['destination']} …"
                )
            elif kind == "progress":
                out.progress(e.get("bytes_sent", 0), e.get("bytes_total", 0), "exporting")
            elif kind == "complete":
                out.close_bar()
                out.say(
                    f"Exported and stored: {e['stored']} instance(s) on {e['destination']} "
                    f"(export {export_id})."
                )
                return EXIT_OK
            elif kind == "error":
                out.close_bar()
                out.say(f"Error: {e['message']}")
                return EXIT_FAILED
    return EXIT_FAILED


class _client:
    """``async with _client(args) as client`` — a NodeClient for ``--node``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._cm: Any = None

    async def __aenter__(self) -> NodeClient:
        data_dir = Path(self.args.data_dir).expanduser()
        read_token(data_dir)  # a clear error before any request when the token is missing
        self._cm = connect_node(self.args.node, data_dir, None)
        client: NodeClient = await self._cm.__aenter__()
        return client

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)
