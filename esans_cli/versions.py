"""``esans versions list | activate V | delete V``: the admin API of a running replica, from
the command line (standard library HTTP only, so it works wherever the client does).

The replica's URL comes from ``--url`` or ``ESANS_ADMIN_URL`` (default
http://localhost:8000), the token from ``--token`` or ``ESANS_ADMIN_TOKEN``. A version may
be given by any unique prefix of at least 8 characters, e.g. the 16 that build and publish
print.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from esans_sampler.errors import EsansError

DEFAULT_URL = "http://localhost:8000"
_TIMEOUT_S = 30.0


class AdminError(EsansError):
    """The admin API refused the call or could not be reached; the message says which."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "versions",
        help="list, activate or delete stored codebook versions (the admin API)",
        description="List, activate (roll back to) or delete stored codebook versions through "
        "the admin API of a running replica.",
    )
    p.add_argument(
        "--url",
        default=None,
        help=f"the replica's HTTP address (ESANS_ADMIN_URL; default {DEFAULT_URL})",
    )
    p.add_argument("--token", default=None, help="the admin token (ESANS_ADMIN_TOKEN)")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every stored version, newest first")
    for name, text in (
        ("activate", "make a stored version the active one (a rollback when it is older)"),
        ("delete", "delete a stored version (never the active one)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("version", help="a version or a unique prefix (>= 8 characters)")
        if name == "delete":
            action.add_argument(
                "--force",
                action="store_true",
                help="delete even while a training run holds a lease on it (pins it)",
            )


def run(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("ESANS_ADMIN_URL") or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get("ESANS_ADMIN_TOKEN")
    if not token:
        raise AdminError("no admin token: pass --token or set ESANS_ADMIN_TOKEN")
    if args.action == "list":
        print(versions_table(_call(url, token, "GET", "/admin/versions")))
    elif args.action == "activate":
        path = f"/admin/versions/{urllib.parse.quote(args.version, safe='')}/activate"
        reply = _call(url, token, "POST", path)
        print(f"active version {reply['active_version']} (this replica serves "
              f"{reply['serving_version']})")  # fmt: skip
    else:
        path = f"/admin/versions/{urllib.parse.quote(args.version, safe='')}"
        if args.force:
            path += "?force=true"
        print(f"deleted version {_call(url, token, 'DELETE', path)['deleted']}")
    return 0


def versions_table(listing: dict[str, Any]) -> str:
    """The ``GET /admin/versions`` answer as a table, the active version starred."""
    rows = [f"{'':2}{'version':<18}{'created (UTC)':<27}{'items':>10}{'size':>12}  complete"]
    for v in listing.get("versions", []):
        rows.append(
            f"{'*' if v['active'] else ' ':2}{v['version'][:16]:<18}{v['created_at']:<27}"
            f"{v['num_items']:>10}{v['size_bytes'] / 1e6:>10.1f}MB  "
            f"{'yes' if v['complete'] else 'NO'}"
        )
    loaded = ", ".join(x[:16] for x in listing.get("loaded_versions", [])) or "none"
    rows.append(f"this replica serves {str(listing.get('serving_version'))[:16]}; "
                f"in memory: {loaded}")  # fmt: skip
    return "\n".join(rows)


def _call(url: str, token: str, method: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url + path, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise AdminError(f"{method} {path}: {exc.code} {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(
            f"cannot reach the admin API at {url} ({reason}); is `esans serve` running there "
            "with ESANS_ADMIN_TOKEN set? (--url / ESANS_ADMIN_URL)"
        ) from exc
