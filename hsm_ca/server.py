"""``hsm-ca serve``: CA certificates, CRLs, OCSP (and later time stamps) over HTTP.

A small ASGI application served by uvicorn. Everything runs on the event
loop's thread: the engine (PKCS#11 modules crash when two threads sign at
once) and the SQLite connection are used from one thread only, and signing is
short; concurrency comes from the loop multiplexing connections, so a client
that connects and sends nothing stalls nobody.

uvicorn by itself never closes a connection that sends nothing or half a
request, and accepts sockets until the process runs out of file descriptors,
after which every request fails. :class:`GuardedProtocol` adds what it lacks,
at the protocol level (so it covers every route and every client): an idle
deadline from the moment a connection has no request in progress, a read
deadline from a request's first byte until its headers and body are in, a write
deadline for a client that stops reading, a bound on header size, and a cap on
open connections below RLIMIT_NOFILE; at the cap the connection that has waited
longest without a request being handled is closed to make room, so idle or
stalled sockets can never lock real clients out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from hsm_ca.errors import ConfigError, HsmCaError, NotFound

if TYPE_CHECKING:
    from asyncio import TimerHandle, Transport

    from hsm_ca.authority import Authority
    from hsm_ca.config import ServerSettings
    from hsm_ca.ocsp import OcspResponder

log = logging.getLogger("hsm_ca.server")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_BODY = 64 * 1024
MAX_HEADER_BYTES = 32 * 1024  # request line and headers; llhttp itself has no limit
FD_HEADROOM = 64  # descriptors kept free for the database, engine, logs and a CRL being signed
MIN_CONNECTIONS = 8
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_DELTA = "-delta"
_CRL_STEM = r"[A-Za-z0-9][A-Za-z0-9._-]{0,69}"  # a name, or a name + "-delta"
GET_LIKE = ("GET", "HEAD")


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    """The client went away (or was timed out) before its request body was complete."""


class _UnknownCa(Exception):
    pass


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # a cut-off body is not a request: answering it could sign a prefix nobody sent
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, content_type: str,
                headers: list[tuple[bytes, bytes]] | None = None, *, head: bool = False) -> None:
    """One response; for HEAD the same headers (Content-Length included) and no body."""
    hdrs = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    hdrs.extend(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _not_allowed(allow: str) -> tuple[Any, ...]:
    status, body, ctype = _text(405, "method not allowed")
    return status, body, ctype, [(b"allow", allow.encode())]


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
        except _Disconnected:
            return
        except _TooLarge:
            status, payload, ctype = _text(413, "request too large")
            headers = None
        except (_UnknownCa, NotFound):
            # never the message: it names the input and, for a CA, lists the home's CAs
            status, payload, ctype = _text(404, "unknown CA" if path.startswith(("/ca/", "/crl/"))
                                           else "not found")
            headers = None
        except HsmCaError as e:
            log.warning("request %s %s failed: %s", method, path, e)
            status, payload, ctype = _text(503, "temporarily unable to sign")
            headers = None
        except Exception:  # never let one request take the server down
            log.exception("internal error on %s %s", method, path)
            status, payload, ctype = _text(500, "internal error")
            headers = None
        await _send(send, status, payload, ctype, headers, head=method == "HEAD")

    def route(self, method: str, path: str, body: bytes, scope: Scope) -> tuple[Any, ...]:
        """(status, body, content type[, headers]); HEAD is answered wherever GET is."""
        if path in ("/health", "/healthz"):
            if method not in GET_LIKE:
                return _not_allowed("GET, HEAD")
            cas = [c.name for c in self.authority.list_cas()]
            doc = {"status": "ok", "cas": cas, "uptime_seconds": int(time.time() - self.started),
                   "ocsp_signatures": self.responder.signatures,
                   # answers given without a fresh signature because a client was over its ration
                   "ocsp_rationed": self.responder.limited}
            return 200, json.dumps(doc).encode(), "application/json"
        if m := re.fullmatch(rf"/ca/({_NAME})\.(crt|pem|der|cer)", path):
            if method not in GET_LIKE:
                return _not_allowed("GET, HEAD")
            if not self._ca_exists(m.group(1)):
                raise _UnknownCa
            cert = self.authority.get_ca(m.group(1)).certificate
            if m.group(2) == "pem":
                return 200, cert.public_bytes(serialization.Encoding.PEM), "application/x-pem-file"
            return 200, cert.public_bytes(serialization.Encoding.DER), "application/pkix-cert"
        if m := re.fullmatch(rf"/crl/({_CRL_STEM})\.crl", path):
            if method not in GET_LIKE:
                return _not_allowed("GET, HEAD")
            from hsm_ca.revocation import current_crl

            name, delta = self._crl_target(m.group(1))
            der = current_crl(self.authority, name, delta=delta)
            return 200, der, "application/pkix-crl"
        if m := re.fullmatch(rf"/ocsp(?:/({_NAME}))?(?:/(.+))?/?", path):
            ca_hint, encoded = m.group(1), m.group(2)
            if method == "POST" and encoded is None:
                ctype = _header(scope, b"content-type")
                if ctype and ctype.split(";")[0].strip().lower() not in (
                        "application/ocsp-request", "application/octet-stream"):
                    return _text(415, "expected application/ocsp-request")
                return self._ocsp(body, ca_hint, get=False, scope=scope)
            if method in GET_LIKE and encoded is not None:
                try:
                    text = urllib.parse.unquote(encoded)
                    text = text.replace("-", "+").replace("_", "/")
                    data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
                except (binascii.Error, ValueError):
                    data = b""
                return self._ocsp(data, ca_hint, get=True, scope=scope)
            status, text, ctype = _text(405, "use POST /ocsp/CA or GET /ocsp/CA/BASE64")
            return status, text, ctype, [(b"allow", b"GET, HEAD" if encoded else b"POST")]
        if path == "/tsa":
            if self.tsa is None:
                return _text(404, "no time-stamping authority configured")
            if method != "POST":
                return _not_allowed("POST")
            return 200, self.tsa(body), "application/timestamp-reply"
        return _text(404, "not found")

    def _ca_exists(self, name: str) -> bool:
        """Exactly this name (one indexed SELECT, so a CA made while serving is found)."""
        return self.authority.store.get_ca(name) is not None

    def _crl_target(self, stem: str) -> tuple[str, bool]:
        """``/crl/STEM.crl`` -> (CA, delta?), resolved against the CAs that exist.

        A CA whose whole name is STEM wins (its full CRL), so a CA named
        ``foo-delta`` from a home made before names were barred from ending in
        ``-delta`` keeps its full CRL; only otherwise is ``-delta`` the delta CRL
        of the CA named by the rest. Anything else is an unknown CA.
        """
        if self._ca_exists(stem):
            return stem, False
        base = stem.removesuffix(_DELTA)
        if base != stem and self._ca_exists(base):
            return base, True
        raise _UnknownCa

    def _ocsp(self, data: bytes, ca_hint: str | None, *, get: bool,
              scope: Scope | None = None) -> tuple[Any, ...]:
        if ca_hint is not None and not self._ca_exists(ca_hint):
            from hsm_ca.ocsp import UNAUTHORIZED

            return 200, UNAUTHORIZED, "application/ocsp-response"
        client = (scope or {}).get("client")
        answer = self.responder.respond(data, ca_hint, client=client[0] if client else None)
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


@dataclass(frozen=True)
class Limits:
    """What one ``serve`` process allows each connection, and how many it holds at once."""

    idle_timeout: float
    read_timeout: float
    write_timeout: float
    max_connections: int
    max_header_bytes: int = MAX_HEADER_BYTES


def _open_descriptors() -> int:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory))
        except OSError:
            continue
    return 32  # unknown platform: a guess, FD_HEADROOM covers the error


def connection_cap(configured: int | None) -> int:
    """The most connections to hold: below RLIMIT_NOFILE, minus what is open and a reserve.

    Called once the database is open, the engine logged in and the listening
    sockets bound, so what they hold is counted; FD_HEADROOM is left for files
    opened later (SQLite's journal, audit checkpoints, log rotation). A
    configured ``[server] max_connections`` can only lower the cap.
    """
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    derived = soft - _open_descriptors() - FD_HEADROOM
    if derived < MIN_CONNECTIONS:
        raise ConfigError(
            f"the open-file limit ({soft}) leaves room for {max(derived, 0)} connections; "
            f"raise it (ulimit -n) to at least {soft - derived + MIN_CONNECTIONS}"
        )
    if configured is not None and configured > derived:
        logging.getLogger("uvicorn.error").warning(
            "[server] max_connections = %d is above what the open-file limit (%d) allows; "
            "using %d", configured, soft, derived)
    return derived if configured is None else min(configured, derived)


class ConnectionGuard:
    """The open connections of one server, for the cap and for choosing whom to close.

    At the cap, a new connection closes the one that has waited longest
    without a request being handled (idle, or still sending its request);
    connections whose request the application is handling are never closed
    for room. If every connection is being handled, the new one is refused.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: dict[Any, None] = {}  # GuardedProtocol -> None, in arrival order
        self.evicted = 0
        self.refused = 0

    def admit(self, conn: Any) -> bool:
        if len(self.open) >= self.limits.max_connections:
            waiting = [c for c in self.open if not c.busy]
            if not waiting:
                self.refused += 1
                return False
            victim = min(waiting, key=lambda c: c.since)
            self.release(victim)
            victim.transport.abort()
            self.evicted += 1
        self.open[conn] = None
        return True

    def release(self, conn: Any) -> None:
        self.open.pop(conn, None)


# the first uvicorn whose HttpToolsProtocol has every hook GuardedProtocol overrides
# (_start_asgi_task came with 0.45.0); pyproject.toml's floor says the same
UVICORN_FLOOR = "0.45.0"
_HOOKS = ("connection_made", "connection_lost", "data_received", "on_message_begin",
          "on_headers_complete", "on_message_complete", "on_response_complete",
          "pause_writing", "resume_writing", "_start_asgi_task", "_unset_keepalive_if_required")


def require_uvicorn() -> None:
    """Refuse to serve on a uvicorn that lacks a hook the guard overrides.

    An override of a method the base class never calls is silently dead code:
    on a uvicorn before 0.45 ``_start_asgi_task`` does not exist, so pipelined
    requests would never learn that their client is gone and the guard would
    think no request is running. Better one clear error than a weaker server.
    """
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    missing = [name for name in _HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
    if missing:
        version = str(getattr(uvicorn, "__version__", "unknown"))[:32]
        raise HsmCaError(
            f"serve needs uvicorn >= {UVICORN_FLOOR} (installed: {version}; its HTTP protocol "
            f"lacks {', '.join(missing)}); upgrade uvicorn")


_TIMEOUT_RESPONSE = (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s")


def guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's httptools protocol with the deadlines, header bound and cap of ``guard``.

    uvicorn arms its keep-alive timer only after a response, and data_received
    cancels it, so a connection that never sends a request, or sends half of
    one, is never closed. These deadlines are per phase and are not reset by
    bytes that do not finish the phase (a byte every second does not keep a
    half-sent request alive).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    limits = guard.limits

    class GuardedProtocol(HttpToolsProtocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.busy = False  # a complete request is with the application
            self.since = time.monotonic()  # start of the current idle or reading phase
            self._deadline: TimerHandle | None = None
            self._write_deadline: TimerHandle | None = None
            self._header_bytes = 0  # request line and headers of the current request so far
            self._in_head = False  # a request has begun and its headers are not complete
            self._reading = False  # a request has begun and its body is not complete
            self._completions = 0  # headers or messages completed by the current read
            self._running: Any = None  # the request being answered (pipelines queue the rest)

        # ---------------------------------------------------------- phases
        def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _idle(self) -> None:
            self.since = time.monotonic()
            self._arm(limits.idle_timeout, self._close_idle)

        def _close_idle(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def _close_reading(self) -> None:
            self._deadline = None
            self._refuse(408, b"Request Timeout", b"request timeout\n")

        def _refuse(self, status: int, phrase: bytes, body: bytes) -> None:
            """Answer (unless a response has begun) and close: the request is abandoned."""
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete or not \
                    self.cycle.response_started:
                self.transport.write(_TIMEOUT_RESPONSE % (status, phrase, len(body), body))
            self.transport.close()

        # ------------------------------------------------ uvicorn's hooks
        def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if not guard.admit(self):
                transport.abort()
                return
            self._idle()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None
            guard.release(self)
            super().connection_lost(exc)
            # uvicorn tells only the newest request of a pipeline that the client is gone;
            # the one being answered would go on writing to the closed transport
            for cycle in (self._running, *(c for c, _app in self.pipeline)):
                if cycle is not None and not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def data_received(self, data: bytes) -> None:
            # httptools buffers an unfinished header line itself, without limit, so the
            # bound is on the bytes read while a request's headers are incomplete: a read
            # that finished headers or a message is not counted (it also holds a body or
            # the previous request), so the bound is exceeded by at most one read
            self._completions = 0
            super().data_received(data)
            if self._in_head and not self._completions:
                self._header_bytes += len(data)
                if self._header_bytes > limits.max_header_bytes:
                    self._refuse(431, b"Request Header Fields Too Large",
                                 b"request headers too large\n")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.since = time.monotonic()
            self._in_head = self._reading = True
            self._header_bytes = 0
            self._arm(limits.read_timeout, self._close_reading)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._completions += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._completions += 1
            self._reading = False
            if self.cycle is not None and self.cycle.response_complete:
                self._idle()  # answered before the body was in (413): nothing is handled now
            else:
                self._disarm()
                self.busy = True

        def on_response_complete(self) -> None:
            """One answer is out; the phase is now that of the next request, if any.

            super() starts the next pipelined request, whose answer may take a while
            to write (or whose body may still be coming): it must not be timed out as
            idle, nor (once complete) evicted at the cap. A request that has begun but
            is not complete keeps the read deadline armed at its first byte, unless it
            is the one just answered (413 before its body was in): then it is idle.
            """
            super().on_response_complete()
            # uvicorn arms its keep-alive timer whenever no request is queued, even over a
            # request that has begun arriving; the idle deadline here replaces it
            self._unset_keepalive_if_required()
            running = self._running
            if running is not None and not running.response_complete and not running.more_body:
                return  # the next request is complete and with the application: still busy
            self.busy = False
            answered_early = (running is self.cycle and running.response_complete
                              and not self._in_head)
            if not self.transport.is_closing() and (not self._reading or answered_early):
                self._idle()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_deadline is None:
                self._write_deadline = self.loop.call_later(limits.write_timeout, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None

        def _stalled(self) -> None:
            """The client stopped reading: reset, so the kernel drops what is queued too.

            A plain close would leave the unsent answers in the kernel behind a FIN
            that a client with a zero window never lets through.
            """
            self._write_deadline = None
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    return GuardedProtocol


def listen(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Bind and listen on every address HOST resolves to; one clear error if any fails.

    Bound here rather than by uvicorn, which logs its own "ERROR:" line and
    exits 3 when the port is taken.
    """
    where = f"{host[:64]}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise HsmCaError(f"cannot listen on {where}: {getattr(e, 'strerror', None) or e}") from e
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise HsmCaError(f"cannot listen on {where}: {e.strerror or e}") from e
    return socks


def limits_for(settings: ServerSettings) -> Limits:
    return Limits(settings.idle_timeout, settings.read_timeout, settings.write_timeout,
                  connection_cap(settings.max_connections))


def serve(authority: Authority, host: str, port: int, *,
          tsa: Callable[[bytes], bytes] | None = None, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM; uvicorn finishes in-flight requests before exiting."""
    import uvicorn

    from hsm_ca.ocsp import OcspResponder

    require_uvicorn()
    sockets = listen(host, port)
    settings = authority.config.server
    try:
        limits = limits_for(settings)
    except HsmCaError:
        for sock in sockets:
            sock.close()
        raise
    guard = ConnectionGuard(limits)
    responder = OcspResponder(authority)
    app = CaApp(authority, responder, tsa)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=True,
        http=guarded_protocol(guard), timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]
        lifespan="on", server_header=False, timeout_graceful_shutdown=10,
        # clients are served directly: X-Forwarded-For from a local client would pick the
        # address the OCSP nonce limit is counted against
        proxy_headers=False,
    )
    # uvicorn re-raises the signal that stopped it once shutdown is complete; with these
    # handlers in place that is a no-op, so a graceful stop on SIGTERM exits 0
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    bound = ", ".join(f"http://{_address(s)}" for s in sockets)
    logging.getLogger("uvicorn.error").info(
        "hsm-ca serve on %s: at most %d connections, idle timeout %gs, read timeout %gs, "
        "write timeout %gs", bound, limits.max_connections, limits.idle_timeout,
        limits.read_timeout, limits.write_timeout)
    uvicorn.Server(config).run(sockets=sockets)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
