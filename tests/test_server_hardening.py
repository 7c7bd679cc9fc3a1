"""``hsm-ca serve`` against hostile clients: idle and half-sent connections, more
connections than file descriptors, nonce floods, exact CRL routes, HEAD, 404s, bind errors.

Every server here is a real ``python -m hsm_ca serve`` process on a free loopback
port, configured through the home's ``hsm-ca.toml`` (``[server]`` timeouts are
short so the suite runs in seconds); clients are raw sockets, http.client and the
openssl CLI. Findings of issue 13: 3 (timeouts, connection cap), 5 (routing),
14 (bind error, HEAD, 404), 16 (nonce ration).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import resource
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_SCRYPT_N, USER_PIN, make_csr, run_process
from cryptography import x509
from cryptography.x509 import ocsp

sys.path.insert(0, str(Path(__file__).parent / "interop"))
from revocation_support import (  # noqa: E402
    check_ocsp_signature,
    free_port,
    nonce_of,
    ocsp_get_path,
    ocsp_line,
    ocsp_request,
    run_openssl,
)

SUCCESSFUL = ocsp.OCSPResponseStatus.SUCCESSFUL


# ----------------------------------------------------------------- the home
def hsm(home: Path, *args: str) -> str:
    r = run_process(home, *args)
    assert r.returncode == 0, f"hsm-ca {' '.join(args)} exited {r.returncode}: {r.stderr}"
    return r.stdout


@dataclass
class Home:
    path: Path
    dir: Path
    root: Path  # PEM files
    issuing: Path
    good: Path
    original_config: str

    def cert(self, path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]

    def configure(self, text: str) -> None:
        """The home's config as ``init`` wrote it (no tables), plus TEXT's keys and tables."""
        top, bracket, tables = text.partition("[")
        (self.path / "hsm-ca.toml").write_text(
            top + self.original_config + ("\n" + bracket + tables if bracket else ""))

    def ocsp_rows(self) -> int:
        with sqlite3.connect(f"file:{self.path / 'ca.db'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM audit WHERE action = 'ocsp'").fetchone()[0])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    d = tmp_path_factory.mktemp("serve")
    h = d / "home"
    hsm(h, "init", "--scrypt-n", str(TEST_SCRYPT_N))
    hsm(h, "ca", "create-root", "root", "--subject", "CN=Hardening Root,O=Test")
    hsm(h, "ca", "create-intermediate", "issuing", "--parent", "root",
        "--subject", "CN=Hardening Issuing,O=Test", "--path-length", "0")
    csr = d / "good.csr"
    csr.write_bytes(make_csr(cn=None, dns=["good.example.com"]))
    good = d / "good.pem"
    hsm(h, "sign", str(csr), "--ca", "issuing", "--profile", "tls-server", "-o", str(good))
    root, issuing = d / "root.pem", d / "issuing.pem"
    hsm(h, "ca", "export", "root", "-o", str(root))
    hsm(h, "ca", "export", "issuing", "-o", str(issuing))
    return Home(h, d, root, issuing, good, (h / "hsm-ca.toml").read_text())


# --------------------------------------------------------------- the server
class Server:
    """``hsm-ca serve`` as a process; ``nofile`` lowers its RLIMIT_NOFILE (soft and hard)."""

    def __init__(self, home: Home, *, nofile: int | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.log = home.dir / f"serve-{self.port}.log"
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
        env["HSM_CA_PIN"] = USER_PIN
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hsm_ca", "--home", str(self.home.path), "serve",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=limit,
            )
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.tail()}"
            try:
                if self.request("GET", "/health", timeout=1).status == 200:
                    return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"serve did not start:\n{self.tail()}"
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 5,
                source: str | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        r.body = r.read()  # type: ignore[attr-defined]
        conn.close()
        return r

    def ocsp(self, der: bytes, source: str | None = None) -> ocsp.OCSPResponse:
        r = self.request("POST", "/ocsp/issuing", der,
                         {"Content-Type": "application/ocsp-request"}, source=source)
        assert r.status == 200, (r.status, r.body)  # type: ignore[attr-defined]
        return ocsp.load_der_ocsp_response(r.body)  # type: ignore[attr-defined]


def connect(port: int, opening: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if opening:
        s.sendall(opening)
    return s


def closed_within(socks: dict[str, socket.socket], limit: float) -> dict[str, float]:
    """When (time.monotonic) the server closed each socket (EOF or reset); inf if not in LIMIT s."""
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    for name, s in socks.items():
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, name)
    closed: dict[str, float] = {}
    while len(closed) < len(socks) and time.monotonic() - t0 < limit:
        for key, _ in sel.select(timeout=0.05):
            try:
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except ConnectionError:
                data = b""
            if not data:
                closed[key.data] = time.monotonic()
                sel.unregister(key.fileobj)
    sel.close()
    return {name: closed.get(name, float("inf")) for name in socks}


# ================================================= finding 3: timeouts and cap
def test_half_sent_requests_and_idle_sockets_are_closed_within_the_timeouts(home: Home) -> None:
    home.configure("[server]\nidle_timeout = 1\nread_timeout = 2\n")
    with Server(home) as srv:
        first = {
            "nothing": b"",  # connects and never sends a request
            "one byte": b"P",
            "half headers": b"POST /ocsp/issuing HTTP/1.1\r\nHost: t\r\n",
            "half body": b"POST /ocsp/issuing HTTP/1.1\r\nHost: t\r\nContent-Type: "
                         b"application/ocsp-request\r\nContent-Length: 1000\r\n\r\n0\x82",
        }
        opened: dict[str, float] = {}
        socks: dict[str, socket.socket] = {}
        for name, data in first.items():
            opened[name] = time.monotonic()
            socks[name] = connect(srv.port, data)
        keep_alive = connect(srv.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200 ")  # an answered keep-alive
        opened["keep-alive"], socks["keep-alive"] = time.monotonic(), keep_alive

        # a header byte every 0.3 s must not keep a half-sent request alive
        def dribble() -> float:
            s = connect(srv.port, b"GET /health HTTP/1.1\r\n")
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 5:
                    s.sendall(b"X")
                    time.sleep(0.3)
            except OSError:
                return time.monotonic() - t0
            finally:
                s.close()
            return float("inf")

        with ThreadPoolExecutor(1) as pool:
            dribbled = pool.submit(dribble)
            closed = closed_within(socks, 6)
            times = {name: closed[name] - opened[name] for name in socks}
            times["dribble"] = dribbled.result()
        assert srv.proc is not None and srv.proc.poll() is None, srv.tail()
        for name in ("nothing", "keep-alive"):  # idle: 1 s
            assert 0.7 < times[name] < 2.5, (name, times)
        for name in ("one byte", "half headers", "half body", "dribble"):  # reading: 2 s
            assert 1.7 < times[name] < 3.5, (name, times)
        for s in socks.values():
            s.close()
        assert srv.request("GET", "/health").status == 200


def test_header_flood_is_refused_not_buffered(home: Home) -> None:
    home.configure("")
    with Server(home) as srv:
        s = connect(srv.port, b"GET /health HTTP/1.1\r\nX-Long: ")
        sent = 0
        with pytest.raises(OSError):  # reset once the server refused, not after gigabytes
            while sent < 64 * 1024 * 1024:
                s.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 8 * 1024 * 1024, sent
        s.close()
        assert srv.request("GET", "/health").status == 200


def _log_cap(srv: Server) -> int:
    m = re.search(r"at most (\d+) connections", srv.log.read_text())
    assert m, srv.tail()
    return int(m.group(1))


def test_more_idle_connections_than_the_cap_and_the_fd_limit(home: Home) -> None:
    """RLIMIT_NOFILE 192 and 260 idle or half-sent sockets held open: still answered."""
    home.configure("")  # the default idle timeout (5 s) outlives this test's phase
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    nofile = 192
    with Server(home, nofile=nofile) as srv:
        held: list[socket.socket] = []
        try:
            for i in range(260):
                held.append(connect(srv.port, b"" if i % 2 else b"GET /health HTTP/1.1\r\n"))
            t0 = time.monotonic()
            for _ in range(3):
                assert srv.request("GET", "/health").status == 200
                resp = srv.ocsp(ocsp_request(leaf, issuing, nonce=os.urandom(16)))
                assert resp.response_status == SUCCESSFUL
                assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
                check_ocsp_signature(resp, issuing)
                r = srv.request("GET", ocsp_get_path("issuing", ocsp_request(leaf, issuing)))
                assert r.status == 200
            assert time.monotonic() - t0 < 5  # not waiting for the idle timeout to free room
            assert srv.open_fds() < nofile - 32, srv.open_fds()
        finally:
            for s in held:
                s.close()
        assert srv.proc is not None and srv.proc.poll() is None, srv.tail()
        cap = _log_cap(srv)  # derived from the limit, leaving room for the home's files
        assert 8 <= cap < nofile - 64, cap


def test_a_configured_cap_holds(home: Home) -> None:
    home.configure("[server]\nmax_connections = 10\nidle_timeout = 30\n")
    with Server(home) as srv:
        assert _log_cap(srv) == 10
        time.sleep(0.2)
        baseline = srv.open_fds()
        held = [connect(srv.port) for _ in range(30)]
        try:
            assert srv.request("GET", "/health").status == 200
            time.sleep(0.3)
            assert srv.open_fds() - baseline <= 10, (baseline, srv.open_fds())  # evicted: closed
        finally:
            for s in held:
                s.close()


@pytest.mark.parametrize("setting, message", [
    ("idle_timeout = 0", "'server.idle_timeout' must be greater than 0"),
    ("read_timeout = \"10\"", "'server.read_timeout' must be a number"),
    ("max_connections = 0", "'server.max_connections' must be an integer"),
    ("max_connections = 2.5", "'server.max_connections' must be an integer"),
    ("header_timeout = 3", "unknown field 'server.header_timeout'"),
])
def test_bad_server_settings_name_file_and_field(home: Home, setting: str, message: str) -> None:
    home.configure(f"[server]\n{setting}\n")
    try:
        r = run_process(home.path, "serve", "--port", str(free_port()))
    finally:
        home.configure("")
    assert r.returncode == 1, r
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "hsm-ca.toml" in r.stderr and message in r.stderr, r.stderr


# ========================================= finding 14: bind, HEAD, 404, 405
def test_port_in_use_is_one_error_line_exit_1(home: Home) -> None:
    home.configure("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_process(home.path, "serve", "--host", "127.0.0.1", "--port", str(port))
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines


def test_serve_refuses_a_uvicorn_without_the_hooks_the_guard_overrides(home: Home) -> None:
    """uvicorn < 0.45 has no ``_start_asgi_task``: the override would be dead code.

    The real CLI is run in a process whose uvicorn lacks that hook, as 0.44
    does (checked by hand against a real uvicorn 0.44.0 too); it must refuse
    with one Error line instead of serving with a silently weaker guard.
    """
    home.configure("")
    code = ("import sys\n"
            "from uvicorn.protocols.http import httptools_impl as m\n"
            "del m.HttpToolsProtocol._start_asgi_task\n"
            "from hsm_ca.entry import main\n"
            "main()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
    env["HSM_CA_PIN"] = USER_PIN
    try:
        r = subprocess.run([sys.executable, "-c", code, "--home", str(home.path), "serve",
                            "--host", "127.0.0.1", "--port", str(free_port())],
                           capture_output=True, text=True, env=env, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("serve ran on a uvicorn without _start_asgi_task")
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "uvicorn >= 0.45" in lines[0] and "_start_asgi_task" in lines[0], lines


def test_the_uvicorn_floor_is_the_one_the_code_needs() -> None:
    import tomllib

    import uvicorn

    from hsm_ca.server import UVICORN_FLOOR

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    floors = [d for d in project["project"]["dependencies"] if d.startswith("uvicorn")]
    assert floors == [f"uvicorn>={UVICORN_FLOOR.removesuffix('.0')}"], floors

    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    assert parts(uvicorn.__version__) >= parts(UVICORN_FLOOR)


@pytest.fixture(scope="module")
def plain(home: Home) -> Iterator[Server]:
    home.configure("")
    with Server(home) as srv:
        yield srv


def test_head_is_answered_like_get(home: Home, plain: Server) -> None:
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    paths = ["/health", "/healthz", "/ca/root.pem", "/ca/issuing.crt", "/ca/root.der",
             "/crl/issuing.crl", "/crl/issuing-delta.crl",
             ocsp_get_path("issuing", ocsp_request(leaf, issuing))]
    for path in paths:
        get = plain.request("GET", path)
        head = plain.request("HEAD", path)
        assert get.status == 200 and head.status == 200, (path, get.status, head.status)
        assert head.body == b"", path  # type: ignore[attr-defined]
        for name in ("content-type", "content-length", "cache-control"):
            if name == "content-length" and path == "/health":
                continue  # uptime may have ticked over a digit
            assert head.getheader(name) == get.getheader(name), (path, name)
        assert int(head.getheader("content-length") or -1) > 0, path


def test_unknown_ca_404_names_no_ca_and_echoes_nothing(plain: Server) -> None:
    probe = "nosuchca"
    for path in (f"/ca/{probe}.pem", f"/ca/{probe}.crt", f"/crl/{probe}.crl",
                 f"/crl/{probe}-delta.crl", f"/crl/{'x' * 64}-delta.crl"):
        r = plain.request("GET", path)
        body = r.body.decode()  # type: ignore[attr-defined]
        assert r.status == 404, (path, r.status)
        assert body == "unknown CA\n", (path, body)
        h = plain.request("HEAD", path)
        assert h.status == 404 and h.body == b"", path  # type: ignore[attr-defined]
    r = plain.request("GET", "/nothing/here/" + "A" * 100)
    assert r.status == 404 and b"A" not in r.body  # type: ignore[attr-defined]


def test_405_says_which_methods_are_allowed(plain: Server) -> None:
    for method, path, allow in (("POST", "/health", "GET, HEAD"),
                                ("PUT", "/ca/root.pem", "GET, HEAD"),
                                ("DELETE", "/crl/root.crl", "GET, HEAD"),
                                ("PUT", "/ocsp/issuing", "POST")):
        r = plain.request(method, path)
        assert r.status == 405 and r.getheader("allow") == allow, (method, path, r.status)


# ============================================ finding 5: exact CRL routing
def _crl(srv: Server, name: str) -> x509.CertificateRevocationList:
    r = srv.request("GET", f"/crl/{name}.crl")
    assert r.status == 200, (name, r.status, r.body)  # type: ignore[attr-defined]
    return x509.load_der_x509_crl(r.body)  # type: ignore[attr-defined]


def _is_delta(crl: x509.CertificateRevocationList) -> bool:
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    except x509.ExtensionNotFound:
        return False
    return True


def test_crl_routes_resolve_to_exactly_one_ca_and_kind(
    tmp_path: Path,
) -> None:
    """A home from before the "-delta" name rule: CA ``foo`` beside CA ``foo-delta``.

    The rule now refuses to create ``foo-delta``, so the legacy CA is made as
    ``legacy`` and renamed in the database, as an old home would hold it.
    """
    h = tmp_path / "home"
    hsm(h, "init", "--scrypt-n", str(TEST_SCRYPT_N))
    hsm(h, "ca", "create-root", "foo", "--subject", "CN=Foo Root")
    hsm(h, "ca", "create-root", "legacy", "--subject", "CN=Foo Delta Root")
    with sqlite3.connect(h / "ca.db") as db:
        db.execute("UPDATE cas SET name = 'foo-delta' WHERE name = 'legacy'")
        for table in ("certificates", "serials", "crls", "audit"):
            db.execute(f"UPDATE {table} SET ca = 'foo-delta' WHERE ca = 'legacy'")
        # the trail says so too (as the old home's trail would), re-chained: the CA checks
        # certificate rows against the trail, and the home has no signed checkpoint yet
        from hsm_ca.audit import FIELDS, GENESIS, chain_value

        assert not db.execute("SELECT 1 FROM audit WHERE action='checkpoint'").fetchone()
        prev = GENESIS
        for row in db.execute(f"SELECT {', '.join(FIELDS)} FROM audit ORDER BY seq").fetchall():
            record = dict(zip(FIELDS, row, strict=True))
            prev = chain_value(prev, record)
            db.execute("UPDATE audit SET chain=? WHERE seq=?", (prev, record["seq"]))
        db.execute("UPDATE meta SET value=json_object('seq', (SELECT max(seq) FROM audit), "
                   "'chain', ?) WHERE key='audit_head'", (prev,))
    legacy = Home(h, tmp_path, h, h, h, (h / "hsm-ca.toml").read_text())
    with Server(legacy) as srv:
        cases = {
            "foo": ("CN=Foo Root", False),
            "foo-delta": ("CN=Foo Delta Root", False),  # the CA's own full CRL
            "foo-delta-delta": ("CN=Foo Delta Root", True),
        }
        for stem, (issuer, delta) in cases.items():
            crl = _crl(srv, stem)
            assert crl.issuer.rfc4514_string() == issuer, stem
            assert _is_delta(crl) is delta, stem
        for stem in ("bar", "bar-delta", "foo-delta-delta-delta", "Foo", "FOO-delta"):
            r = srv.request("GET", f"/crl/{stem}.crl")
            assert r.status == 404 and r.body == b"unknown CA\n", stem  # type: ignore[attr-defined]


def test_delta_route_of_an_ordinary_ca(plain: Server) -> None:
    full, delta = _crl(plain, "issuing"), _crl(plain, "issuing-delta")
    assert not _is_delta(full) and _is_delta(delta)
    assert full.issuer == delta.issuer


# ============================================== finding 16: OCSP nonces
def _openssl_ocsp(home: Home, srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return run_openssl("ocsp", "-issuer", home.issuing, *args, "-url",
                       f"http://127.0.0.1:{srv.port}/ocsp/issuing", "-CAfile", home.root,
                       "-timeout", "10")


def test_ignore_answers_nonce_requests_from_the_cache(home: Home) -> None:
    home.configure('ocsp_nonces = "ignore"\n')
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    with Server(home) as srv:
        cached = srv.ocsp(ocsp_request(leaf, issuing))
        rows = home.ocsp_rows()
        for _ in range(5):
            resp = srv.ocsp(ocsp_request(leaf, issuing, nonce=os.urandom(16)))
            assert nonce_of(resp) is None
            assert resp.tbs_response_bytes == cached.tbs_response_bytes
        r = _openssl_ocsp(home, srv, "-cert", str(home.good))
        assert r.returncode == 0 and "Response verify OK" in r.stderr + r.stdout, r
        assert "no nonce in response" in r.stderr + r.stdout
        assert ocsp_line(r.stdout, str(home.good)) == "good"
        assert home.ocsp_rows() == rows  # no signature, no audit row


def test_honor_rations_nonce_signatures_per_client_address(home: Home) -> None:
    rate, burst = 0.5, 3
    home.configure(f'ocsp_nonces = "honor"\nocsp_nonce_rate = {rate}\nocsp_nonce_burst = {burst}\n')
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    with Server(home) as srv:
        rows = home.ocsp_rows()
        t0 = time.monotonic()
        runs = [_openssl_ocsp(home, srv, "-cert", str(home.good)) for _ in range(12)]
        elapsed = time.monotonic() - t0
        signed = home.ocsp_rows() - rows
        # burst + refill, plus the one shared (cached) answer the rest are given
        assert burst <= signed <= burst + int(rate * elapsed) + 1, (signed, elapsed)
        echoed = 0
        for r in runs:
            out = r.stdout + r.stderr
            assert r.returncode == 0 and "Response verify OK" in out, out
            assert ocsp_line(r.stdout, str(home.good)) == "good", out
            echoed += "no nonce in response" not in out
        assert burst <= echoed <= burst + int(rate * elapsed), (echoed, elapsed)

        # another address has a bucket of its own
        nonce = os.urandom(16)
        other = srv.ocsp(ocsp_request(leaf, issuing, nonce=nonce), source="127.0.0.2")
        assert nonce_of(other) == nonce
        check_ocsp_signature(other, issuing)

        # a never-issued serial has no cached answer: over the limit it is tryLater, unsigned
        rows = home.ocsp_rows()
        answers = [srv.ocsp(ocsp_request(None, issuing, serial=int.from_bytes(os.urandom(12)) | 1))
                   for _ in range(10)]
        tried_later = [a for a in answers if a.response_status == ocsp.OCSPResponseStatus.TRY_LATER]
        assert len(tried_later) >= 8, [a.response_status for a in answers]
        assert home.ocsp_rows() - rows <= 2
        # cached answers stay unlimited
        for _ in range(50):
            assert srv.ocsp(ocsp_request(leaf, issuing)).certificate_status == \
                ocsp.OCSPCertStatus.GOOD
        health = json.loads(srv.request("GET", "/health").body)  # type: ignore[attr-defined]
        assert health["status"] == "ok" and health["ocsp_rationed"] >= len(runs) - echoed + 8


def test_a_global_ration_bounds_nonce_signatures_from_many_addresses(home: Home) -> None:
    """20 addresses, each within its own ration: together they get the global burst, no more."""
    home.configure("ocsp_nonce_rate = 0.001\nocsp_nonce_burst = 3\n"
                   "ocsp_nonce_global_rate = 0.001\nocsp_nonce_global_burst = 6\n")
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    with Server(home) as srv:
        shared = srv.ocsp(ocsp_request(leaf, issuing))  # the cached answer (free)
        rows = home.ocsp_rows()
        echoed = 0
        for i in range(2, 22):
            for _ in range(2):
                nonce = os.urandom(16)
                resp = srv.ocsp(ocsp_request(leaf, issuing, nonce=nonce), source=f"127.0.0.{i}")
                assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
                check_ocsp_signature(resp, issuing)
                if nonce_of(resp) == nonce:
                    echoed += 1
                else:  # over the global ration: the shared answer, still valid
                    assert resp.tbs_response_bytes == shared.tbs_response_bytes
        assert echoed == 6 and home.ocsp_rows() - rows == 6, (echoed, home.ocsp_rows() - rows)
        # what a client sees from an address that never asked: a verified answer, no nonce
        r = _openssl_ocsp(home, srv, "-cert", str(home.good))
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "Response verify OK" in out, out
        assert "no nonce in response" in out and ocsp_line(r.stdout, str(home.good)) == "good"
        assert home.ocsp_rows() - rows == 6


def test_a_rationed_never_issued_serial_is_refused_and_counted_once(home: Home) -> None:
    home.configure("ocsp_nonce_rate = 0.001\nocsp_nonce_burst = 2\n")
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    with Server(home) as srv:
        for _ in range(2):  # the ration spent on echoed nonces
            nonce = os.urandom(16)
            assert nonce_of(srv.ocsp(ocsp_request(leaf, issuing, nonce=nonce))) == nonce

        def rationed() -> int:
            return int(json.loads(srv.request("GET", "/health").body)["ocsp_rationed"])  # type: ignore[attr-defined]

        before, rows = rationed(), home.ocsp_rows()
        for _ in range(5):
            never = ocsp_request(None, issuing, serial=int.from_bytes(os.urandom(12)) | 1,
                                 nonce=os.urandom(16))
            assert srv.ocsp(never).response_status == ocsp.OCSPResponseStatus.TRY_LATER
        assert rationed() - before == 5 and home.ocsp_rows() == rows
        # the openssl client's view of the same: the responder says try later
        r = _openssl_ocsp(home, srv, "-serial", "0x" + os.urandom(12).hex())
        assert "trylater" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        assert rationed() - before == 6 and home.ocsp_rows() == rows


@pytest.mark.parametrize("setting, message", [
    ('ocsp_nonces = "sometimes"', "'ocsp_nonces' must be 'honor' or 'ignore'"),
    ("ocsp_nonce_rate = -1", "'ocsp_nonce_rate' must be a number"),
    ("ocsp_nonce_burst = 1.5", "'ocsp_nonce_burst' must be an integer"),
    ("ocsp_nonce_burst = true", "'ocsp_nonce_burst' must be an integer"),
    ("ocsp_nonce_global_rate = -0.5", "'ocsp_nonce_global_rate' must be a number"),
    ('ocsp_nonce_global_rate = "fast"', "'ocsp_nonce_global_rate' must be a number"),
    ("ocsp_nonce_global_burst = 2.5", "'ocsp_nonce_global_burst' must be an integer"),
    ("ocsp_nonce_global_burst = 10000000", "'ocsp_nonce_global_burst' must be an integer"),
])
def test_bad_nonce_settings_name_file_and_field(home: Home, setting: str, message: str) -> None:
    home.configure(setting + "\n")
    try:
        r = run_process(home.path, "ca", "list")
    finally:
        home.configure("")
    assert r.returncode == 1 and r.stderr.startswith("Error: "), r
    assert "hsm-ca.toml" in r.stderr and message in r.stderr, r.stderr


def test_token_buckets_key_ipv6_by_56_and_ipv4_by_address() -> None:
    from hsm_ca.ocsp import TokenBuckets

    now = [0.0]
    b = TokenBuckets(1.0, 2, max_clients=100, clock=lambda: now[0])
    # one /56: a subscriber's 256 /64s share one ration
    assert b.take("2001:db8:0:1::1") and b.take("2001:db8:0:ff:ffff::9")
    assert not b.take("2001:db8::ffff:1")
    assert b.take("2001:db8:0:100::1")  # the next /56
    assert TokenBuckets.key("2001:db8:0:ab::1") == "2001:db8::/56"
    assert b.take("::ffff:192.0.2.1") and b.take("192.0.2.1") and not b.take("192.0.2.1")
    assert b.take("192.0.2.2")  # IPv4: each address its own
    now[0] = 1.0
    assert b.take("192.0.2.1") and not b.take("192.0.2.1")  # one token a second


def test_an_exhausted_client_stays_limited_when_a_flood_of_addresses_evicts_it() -> None:
    """The review's repro: victim limited, 1,001 addresses, victim's next take() was True."""
    from hsm_ca.ocsp import TokenBuckets

    now = [0.0]
    b = TokenBuckets(1.0, 5, max_clients=1000, clock=lambda: now[0])
    while b.take("2001:db8:aa::1"):
        pass
    for i in range(3000):  # three times the cap: every bucket, the victim's included, evicted
        b.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(b._buckets) <= 1000
    assert "2001:db8:aa::/56" not in b._buckets  # it was evicted, and still:
    assert not b.take("2001:db8:aa::1")
    now[0] = 1.0  # and it refills at the rate, no faster
    assert b.take("2001:db8:aa::1") and not b.take("2001:db8:aa::1")


def test_a_limited_client_keeps_its_bucket_and_quiet_ones_make_room() -> None:
    from hsm_ca.ocsp import TokenBuckets

    now = [0.0]
    b = TokenBuckets(1.0, 3, max_clients=10, clock=lambda: now[0])
    for i in range(10):
        assert b.take(f"192.0.2.{i}")
    victim = "198.51.100.7"
    for i in range(50):  # one newcomer a second: each evicts a bucket that has refilled
        now[0] += 1.0
        while b.take(victim):
            pass
        assert b.take(f"203.0.113.{i}") and b.take(f"203.0.113.{i}") and \
            b.take(f"203.0.113.{i}"), i  # newcomers start full: nothing was given away
        assert victim in b._buckets and len(b._buckets) == 10, i  # asking: never evicted
        assert not b.take(victim)


def test_zero_burst_signs_nothing_and_stores_nothing() -> None:
    from hsm_ca.ocsp import TokenBuckets

    b = TokenBuckets(5.0, 0, max_clients=10)
    assert not any(b.take(f"10.0.{i // 256}.{i % 256}") for i in range(1000))
    assert len(b._buckets) <= 10


def test_the_global_bucket_bounds_all_addresses_together() -> None:
    from hsm_ca.ocsp import TokenBuckets

    now = [0.0]
    b = TokenBuckets(1.0, 2, global_rate=3.0, global_burst=10, clock=lambda: now[0])
    granted = sum(b.take(f"10.0.0.{i}") for i in range(100))
    assert granted == 10
    now[0] = 2.0
    granted = sum(b.take(f"10.0.1.{i}") for i in range(100))
    assert granted == 6  # 3 a second
    now[0] = 2.5  # 1.5 global tokens; a client refused only by the global bucket at t=0
    assert b.take("10.0.0.50") and b._buckets["10.0.0.50"][0] == 1  # was not charged for it
    assert not b.take("10.0.0.51")  # the global bucket is empty again


def test_config_rewrite_keeps_server_and_nonce_settings(home: Home) -> None:
    """``hsm node add`` rewrites hsm-ca.toml: the settings above must survive it."""
    from hsm_ca.config import load_config, write_config

    home.configure('ocsp_nonces = "ignore"\nocsp_nonce_rate = 0.25\nocsp_nonce_burst = 7\n'
                   "ocsp_nonce_global_rate = 3.5\nocsp_nonce_global_burst = 70\n"
                   "[server]\nidle_timeout = 2.5\nread_timeout = 4\nmax_connections = 99\n")
    try:
        cfg = load_config(home.path)
        assert (cfg.ocsp_nonces, cfg.ocsp_nonce_rate, cfg.ocsp_nonce_burst) == ("ignore", 0.25, 7)
        assert (cfg.ocsp_nonce_global_rate, cfg.ocsp_nonce_global_burst) == (3.5, 70)
        assert (cfg.server.idle_timeout, cfg.server.read_timeout, cfg.server.write_timeout,
                cfg.server.max_connections) == (2.5, 4.0, 30.0, 99)
        write_config(cfg)
        assert load_config(home.path) == cfg
    finally:
        home.configure("")


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(home: Home) -> None:
    """Pipelined requests whose answers are never read fill the send buffers: write_timeout."""
    home.configure("[server]\nidle_timeout = 30\nread_timeout = 30\nwrite_timeout = 1\n")
    with Server(home) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.port))
        s.setblocking(False)
        requests = memoryview(b"GET /ca/root.pem HTTP/1.1\r\nHost: t\r\n\r\n" * 50_000)
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < 1.5 and sent < len(requests):  # what it takes in 1.5 s
            try:
                sent += s.send(requests[sent:])
            except BlockingIOError:
                time.sleep(0.01)
        # never reading: once the server's buffers are full (how soon depends on its speed),
        # it must reset the connection within write_timeout; the reset shows as SO_ERROR
        error = 0
        while not error and time.monotonic() - t0 < 20:
            time.sleep(0.1)
            error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        s.close()
        assert error == errno.ECONNRESET, (os.strerror(error), sent)
        assert srv.request("GET", "/health").status == 200


# ======================= pipelining: deadlines follow the request being answered
PEM_END = b"-----END CERTIFICATE-----\n"


def _read_until(s: socket.socket, done: Callable[[bytes], bool], limit: float) -> tuple[bytes, str]:
    """Bytes read until DONE(bytes) or LIMIT s; and how it ended (done, eof, reset, timeout)."""
    s.settimeout(0.2)
    got = b""
    t0 = time.monotonic()
    while not done(got):
        if time.monotonic() - t0 > limit:
            return got, "timeout"
        try:
            chunk = s.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionError:
            return got, "reset"
        if not chunk:
            return got, "eof"
        got += chunk
    return got, "done"


@pytest.mark.parametrize("cut", ["in its body", "in its headers"])
def test_a_pipelined_request_is_not_cut_off_by_the_idle_timeout(home: Home, cut: str) -> None:
    """A request pipelined behind another, its rest sent 1 s later: within read_timeout (5 s)
    but past idle_timeout (0.2 s). Answering the first one armed the idle timer over it."""
    home.configure("[server]\nidle_timeout = 0.2\nread_timeout = 5\n")
    leaf, issuing = home.cert(home.good), home.cert(home.issuing)
    with Server(home) as srv:
        nonce = os.urandom(16)
        body = ocsp_request(leaf, issuing, nonce=nonce)
        second = (b"POST /ocsp/issuing HTTP/1.1\r\nHost: t\r\n"
                  b"Content-Type: application/ocsp-request\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        at = len(second) - len(body) + 10 if cut == "in its body" else 30
        s = connect(srv.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + second[:at])
        first, how = _read_until(s, lambda b: b.endswith(b"}"), 5)  # /health: answered
        assert first.startswith(b"HTTP/1.1 200 "), (how, first)
        time.sleep(1.0)
        try:
            s.sendall(second[at:])
        except OSError as e:
            pytest.fail(f"closed while its request was being read: {e}")
        got, how = _read_until(s, lambda b: b"\r\n\r\n" in b and len(b) > b.index(
            b"\r\n\r\n") + 4 + int(re.search(rb"content-length: (\d+)", b)[1]) - 1, 5)  # type: ignore[index]
        s.close()
        assert got.startswith(b"HTTP/1.1 200 "), (how, got[:200])
        resp = ocsp.load_der_ocsp_response(got[got.index(b"\r\n\r\n") + 4:])
        assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD and nonce_of(resp) == nonce


def test_a_connection_whose_pipelined_answers_are_being_written_is_kept(home: Home) -> None:
    """Pipelined requests whose answers the client reads late (after idle_timeout, before
    write_timeout): while they are being written the connection is neither timed out as
    idle nor evicted at the cap by newcomers; every answer arrives."""
    home.configure("[server]\nidle_timeout = 0.2\nread_timeout = 30\nwrite_timeout = 30\n"
                   "max_connections = 8\n")
    n = 8000  # about 6 MB of answers: more than the kernel buffers (up to 4 MB) hold
    with Server(home) as srv, ThreadPoolExecutor(1) as pool:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.port))
        sent = pool.submit(s.sendall, b"GET /ca/root.pem HTTP/1.1\r\nHost: t\r\n\r\n" * n)
        time.sleep(1.0)  # the server fills the buffers, then waits for the client to read
        newcomers = [connect(srv.port) for _ in range(20)]  # past the cap of 8
        time.sleep(0.5)
        got, how = _read_until(s, lambda b: b.count(PEM_END) == n, 30)
        for c in newcomers:
            c.close()
        s.close()
        assert got.count(PEM_END) == n, (how, got.count(PEM_END))
        assert sent.exception() is None
        assert srv.request("GET", "/health").status == 200
