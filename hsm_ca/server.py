"""``hsm-ca serve``: CA certificates, CRLs, OCSP (and later time stamps) over HTTP.

A small ASGI application served by uvicorn. Everything runs on the event
loop's thread: the engine (PKCS#11 modules crash when two threads sign at
once) and the SQLite connection are used from one thread only, and signing is
short; concurrency comes from the loop multiplexing connections, so a client
that connects and sends nothing stalls nobody.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from hsm_ca.errors import HsmCaError, NotFound

if TYPE_CHECKING:
    from hsm_ca.authority import Authority
    from hsm_ca.ocsp import OcspResponder

log = logging.getLogger("hsm_ca.server")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_BODY = 64 * 1024
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


class _TooLarge(Exception):
    pass


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, content_type: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    hdrs = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    hdrs.extend(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _text(status: int, message: str) -> tuple[int, bytes, str]:
    return status, (message + "\n").encode(), "text/plain; charset=utf-8"


class CaApp:
    """The ASGI application; routes are fixed by ../shared/CLI.md."""

    def __init__(self, authority: Authority, responder: OcspResponder,
                 tsa: Callable[[bytes], bytes] | None = None) -> None:
        self.authority = authority
        self.responder = responder
        self.tsa = tsa
        self.started = time.time()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope["method"]
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        try:
            body = await _body(receive) if method == "POST" else b""
            status, payload, ctype, *extra = self.route(method, path, body, scope)
            headers = extra[0] if extra else None
        except _TooLarge:
            status, payload, ctype = _text(413, "request too large")
            headers = None
        except NotFound as e:
            status, payload, ctype = _text(404, str(e))
            headers = None
        except HsmCaError as e:
            log.warning("request %s %s failed: %s", method, path, e)
            status, payload, ctype = _text(503, "temporarily unable to sign")
            headers = None
        except Exception:  # never let one request take the server down
            log.exception("internal error on %s %s", method, path)
            status, payload, ctype = _text(500, "internal error")
            headers = None
        await _send(send, status, payload, ctype, headers)

    def route(self, method: str, path: str, body: bytes, scope: Scope) -> tuple[Any, ...]:
        if path in ("/health", "/healthz"):
            if method != "GET":
                return _text(405, "method not allowed")
            cas = [c.name for c in self.authority.list_cas()]
            doc = {"status": "ok", "cas": cas, "uptime_seconds": int(time.time() - self.started),
                   "ocsp_signatures": self.responder.signatures}
            return 200, json.dumps(doc).encode(), "application/json"
        if m := re.fullmatch(rf"/ca/({_NAME})\.(crt|pem|der|cer)", path):
            if method != "GET":
                return _text(405, "method not allowed")
            cert = self.authority.get_ca(m.group(1)).certificate
            if m.group(2) == "pem":
                return 200, cert.public_bytes(serialization.Encoding.PEM), "application/x-pem-file"
            return 200, cert.public_bytes(serialization.Encoding.DER), "application/pkix-cert"
        if m := re.fullmatch(rf"/crl/({_NAME}?)(-delta)?\.crl", path):
            if method != "GET":
                return _text(405, "method not allowed")
            from hsm_ca.revocation import current_crl

            name, delta = m.group(1), bool(m.group(2))
            if name.endswith("-delta"):
                name, delta = name[: -len("-delta")], True
            der = current_crl(self.authority, name, delta=delta)
            return 200, der, "application/pkix-crl"
        if m := re.fullmatch(rf"/ocsp(?:/({_NAME}))?(?:/(.+))?/?", path):
            ca_hint, encoded = m.group(1), m.group(2)
            if method == "POST" and encoded is None:
                ctype = _header(scope, b"content-type")
                if ctype and ctype.split(";")[0].strip().lower() not in (
                        "application/ocsp-request", "application/octet-stream"):
                    return _text(415, "expected application/ocsp-request")
                return self._ocsp(body, ca_hint, get=False)
            if method == "GET" and encoded is not None:
                try:
                    text = urllib.parse.unquote(encoded)
                    text = text.replace("-", "+").replace("_", "/")
                    data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
                except (binascii.Error, ValueError):
                    data = b""
                return self._ocsp(data, ca_hint, get=True)
            return _text(405, "use POST /ocsp/CA or GET /ocsp/CA/BASE64")
        if path == "/tsa":
            if self.tsa is None:
                return _text(404, "no time-stamping authority configured")
            if method != "POST":
                return _text(405, "method not allowed")
            return 200, self.tsa(body), "application/timestamp-reply"
        return _text(404, "not found")

    def _ocsp(self, data: bytes, ca_hint: str | None, *, get: bool) -> tuple[Any, ...]:
        if ca_hint is not None:
            try:
                self.authority.get_ca(ca_hint)
            except NotFound:
                from hsm_ca.ocsp import UNAUTHORIZED

                return 200, UNAUTHORIZED, "application/ocsp-response"
        answer = self.responder.respond(data, ca_hint)
        headers: list[tuple[bytes, bytes]] = []
        if get and answer.cacheable and answer.this_update and answer.next_update:
            max_age = int(min(self.responder.cache_seconds,
                              (answer.next_update - answer.this_update).total_seconds()))
            headers = [
                (b"cache-control", f"max-age={max_age}, public, no-transform, must-revalidate".encode()),
                (b"last-modified", email.utils.format_datetime(answer.this_update, usegmt=True).encode()),
                (b"expires", email.utils.format_datetime(answer.next_update, usegmt=True).encode()),
                (b"etag", f'"{hashlib.sha1(answer.der).hexdigest()}"'.encode()),
            ]
        return 200, answer.der, "application/ocsp-response", headers


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def serve(authority: Authority, host: str, port: int, *,
          tsa: Callable[[bytes], bytes] | None = None, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM; uvicorn finishes in-flight requests before exiting."""
    import uvicorn

    from hsm_ca.ocsp import OcspResponder

    responder = OcspResponder(authority)
    app = CaApp(authority, responder, tsa)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=True,
        timeout_keep_alive=5, lifespan="on", server_header=False,
        timeout_graceful_shutdown=10,
    )
    # uvicorn re-raises the signal that stopped it once shutdown is complete; with these
    # handlers in place that is a no-op, so a graceful stop on SIGTERM exits 0
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
