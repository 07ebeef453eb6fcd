"""``python -m esans_service.healthcheck``: the container's own liveness check.

Calls ``/healthz`` of the replica in this container over loopback, over TLS when
``ESANS_TLS_CERT_FILE`` is set (the certificate is not checked against the loopback address;
with ``ESANS_TLS_CLIENT_CA_FILE`` the replica's own certificate is presented as the client
certificate). Exit 0 when healthy, 1 otherwise.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("ESANS_HTTP_PORT", "8000")
    cert, key = os.environ.get("ESANS_TLS_CERT_FILE"), os.environ.get("ESANS_TLS_KEY_FILE")
    context = None
    scheme = "http"
    if cert and key:
        scheme = "https"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own replica, over loopback
        if os.environ.get("ESANS_TLS_CLIENT_CA_FILE"):
            context.load_cert_chain(cert, key)
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/healthz", timeout=4, context=context
        ) as reply:
            return 0 if reply.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
