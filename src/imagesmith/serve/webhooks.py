"""Job webhooks: when a job with a ``callback_url`` finishes, its final state is POSTed there as JSON, signed
``X-Imagesmith-Signature: sha256=<hex HMAC of the body>`` with the server's secret (``IMAGESMITH_WEBHOOK_SECRET``,
else one generated once under the home), and retried with exponential backoff on failure."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

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


def deliver(url: str, payload: dict, secret: str, *, attempts: int = 5, backoff: float = 1.0,
            timeout: float = 10.0) -> bool:
    """POST ``payload``; retry (backoff x 1, 2, 4...) on network errors and 5xx/429. True when delivered."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "X-Imagesmith-Signature": sign(body, secret),
               "X-Imagesmith-Event": "job." + str(payload.get("status"))}
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                        timeout=timeout) as resp:
                if resp.status < 300:
                    return True
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                log.warning("webhook %s refused: HTTP %s", url, exc.code)
                return False
        except (urllib.error.URLError, OSError) as exc:
            log.info("webhook %s attempt %d failed: %s", url, attempt + 1, exc)
        time.sleep(backoff * 2 ** attempt)
    return False


def deliver_async(url: str, payload: dict, secret: str, **kw) -> threading.Thread:
    t = threading.Thread(target=deliver, args=(url, payload, secret), kwargs=kw, daemon=True, name="webhook")
    t.start()
    return t
