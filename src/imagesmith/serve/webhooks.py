"""Job webhooks: when a job with a ``callback_url`` finishes, its final state is POSTed there as JSON, signed
``X-Imagesmith-Signature: sha256=<hex HMAC of the body>`` with the server's secret (``IMAGESMITH_WEBHOOK_SECRET``,
else one generated once under the home), and retried with exponential backoff on failure.

Safe by default against server-side request forgery (GitHub's, Stripe's and Slack's rule): the target host is
resolved once per attempt and the connection goes to that address (no second lookup for DNS rebinding to win);
loopback, private, link-local, shared (CGNAT), multicast, reserved and unspecified addresses, IPv4 and IPv6,
IPv4-mapped forms included, are refused unless the admin's allow-list ``IMAGESMITH_WEBHOOK_ALLOW`` (comma-separated
addresses or networks, e.g. ``10.0.0.0/8,127.0.0.1``) names them; redirects are never followed."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..core.errors import BadRequest

log = logging.getLogger(__name__)


def webhook_secret(home: Path) -> str:
    env = os.environ.get("IMAGESMITH_WEBHOOK_SECRET")
    if env:
        return env
    path = Path(home) / "webhook.secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def allowed_networks(raw: str | None = None) -> list:
    """The admin's allow-list (``IMAGESMITH_WEBHOOK_ALLOW``) as networks; a bad entry is a clear error."""
    raw = os.environ.get("IMAGESMITH_WEBHOOK_ALLOW", "") if raw is None else raw
    nets = []
    for item in filter(None, (x.strip() for x in raw.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise BadRequest(f"IMAGESMITH_WEBHOOK_ALLOW: {item!r} is not an address or network") from None
    return nets


def _public(ip, allow: list) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip.version == net.version and ip in net for net in allow):
        return True
    return ip.is_global and not ip.is_multicast  # excludes loopback, private, link-local, CGNAT, reserved, ::


def resolve_target(url: str, allow: list | None = None) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to) of a webhook URL, or BadRequest saying why it is refused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("callback_url must be an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BadRequest("callback_url has a bad port") from None
    allow = allowed_networks() if allow is None else allow
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise BadRequest(f"callback_url: cannot resolve host {parts.hostname!r}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [str(a) for a in addresses if not _public(a, allow)]
    if refused or not addresses:
        raise BadRequest(f"callback_url: {parts.hostname} resolves to {', '.join(refused) or 'nothing'}, a loopback, "
                         f"private, link-local or otherwise non-public address; webhooks go to public addresses "
                         f"unless an admin allows it (IMAGESMITH_WEBHOOK_ALLOW)")
    return parts.scheme, parts.hostname, port, str(addresses[0])


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an already-checked address, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an already-checked address; the certificate is checked against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _post_once(url: str, body: bytes, headers: dict, timeout: float) -> int:
    """One POST, to the address checked just now; the HTTP status (a redirect is an answer, not followed)."""
    scheme, host, port, address = resolve_target(url)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = (_PinnedHTTPS if scheme == "https" else _PinnedHTTP)(host, port, address, timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def deliver(url: str, payload: dict, secret: str, *, attempts: int = 5, backoff: float = 1.0,
            timeout: float = 10.0) -> bool:
    """POST ``payload``; retry (backoff x 1, 2, 4...) on network errors and 5xx/429. True when delivered."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "X-Imagesmith-Signature": sign(body, secret),
               "X-Imagesmith-Event": "job." + str(payload.get("status"))}
    for attempt in range(attempts):
        try:
            status = _post_once(url, body, headers, timeout)
            if status < 300:
                return True
            if status < 500 and status != 429:  # refused, or a redirect we do not follow
                log.warning("webhook %s answered HTTP %s; not retried", url, status)
                return False
        except BadRequest as exc:  # the name now points somewhere it may not: never retried into
            log.warning("webhook %s refused: %s", url, exc)
            return False
        except OSError as exc:
            log.info("webhook %s attempt %d failed: %s", url, attempt + 1, exc)
        time.sleep(backoff * 2 ** attempt)
    return False


def deliver_async(url: str, payload: dict, secret: str, **kw) -> threading.Thread:
    t = threading.Thread(target=deliver, args=(url, payload, secret), kwargs=kw, daemon=True, name="webhook")
    t.start()
    return t
