"""An RFC 3161 time-stamping authority whose key lives in the HSM engine.

Every token is a CMS SignedData over a TSTInfo, signed with signed attributes
that include ESS signingCertificateV2 (RFC 5816), with a serial number that is
reserved in the same table as certificate serials (so it is unique and never
reused) and an audit record committed before the reply leaves.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import secrets
from typing import TYPE_CHECKING, Any

from asn1crypto import algos, tsp
from cryptography import x509
from cryptography.x509.oid import NameOID

from hsm_ca.cms import build_signed_data, digest_name_for
from hsm_ca.errors import HsmCaError, NotFound, PolicyViolation
from hsm_ca.serials import format_serial, new_serial
from hsm_ca.x509util import rfc3339

if TYPE_CHECKING:
    from hsm_ca.authority import Authority

ACCEPTED_HASHES = {"sha256": 32, "sha384": 48, "sha512": 64}
MAX_REQUEST = 16 * 1024
DEFAULT_NAME = "default"


def create_tsa(
    authority: Authority,
    ca_name: str,
    *,
    subject: x509.Name | None = None,
    key_type: str | None = None,
    days: int | None = None,
    name: str = DEFAULT_NAME,
) -> dict[str, Any]:
    """Generate the TSA key in the engine and certify it with the timestamping profile."""
    from hsm_ca.errors import AlreadyExists
    from hsm_ca.names import check_name

    check_name(name, "time-stamping authority name")
    store = authority.store

    def refuse_taken() -> None:  # names are unique regardless of case (CLI.md "Names")
        taken = store.name_in_use("tsa", "name", name)
        if taken is not None:
            raise AlreadyExists(f"a time-stamping authority named {taken!r} already exists")

    refuse_taken()
    ca = authority.get_ca(ca_name)
    if key_type is None:
        key_type = "ec-p256" if ca.key_type == "ed25519" else ca.key_type
    subject = subject or x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"hsm-ca Time-Stamping Authority ({ca_name})"),
    ])
    label = f"tsa-{name}"
    # a per-TSA policy OID under the UUID arc (ITU-T X.667), so no registration is needed
    policy = f"2.25.{secrets.randbits(122)}"
    rows: list[dict[str, Any]] = []

    def record(issued: Any) -> None:  # committed with the certificate, or not at all
        refuse_taken()  # again under the write lock: a concurrent create may have won
        row = {"name": name, "ca": ca_name, "key_label": label, "serial": issued.serial,
               "pem": issued.pem, "policy": policy,
               "created": rfc3339(_dt.datetime.now(_dt.UTC))}
        store.upsert_row("tsa", row, "name")
        rows.append(row)

    authority.issue_for_engine_key(ca_name, "timestamping", subject, label, key_type, days=days,
                                   on_issued=record)
    return rows[0]


class TimeStampAuthority:
    """Answers TimeStampReq messages; owned by one Authority (one engine login)."""

    def __init__(self, authority: Authority, name: str = DEFAULT_NAME) -> None:
        row = authority.store.get_row("tsa", "name", name)
        if row is None:
            raise NotFound(
                f"no time-stamping authority {name!r}; create one with 'hsm-ca tsa create --ca NAME'"
            )
        self.authority = authority
        self.row = row
        self.cert = x509.load_pem_x509_certificate(row["pem"].encode())
        self.policy = row["policy"]
        self._handle: Any = None

    def _key(self) -> Any:
        if self._handle is None:
            handle = self.authority.engine().get_key(self.row["key_label"])
            if handle.public_key() != self.cert.public_key():
                raise PolicyViolation("the TSA key in the engine does not match its certificate")
            self._handle = handle
        return self._handle

    def chain(self) -> list[x509.Certificate]:
        return self.authority.chain(self.row["ca"], include_root=False)

    def timestamp(self, hash_name: str, imprint: bytes, *, nonce: int | None = None,
                  cert_req: bool = True, detail: str = "") -> bytes:
        """Sign a TimeStampToken (DER ContentInfo) over a message imprint."""
        now = _dt.datetime.now(_dt.UTC)
        if now > self.cert.not_valid_after_utc:
            raise PolicyViolation("the time-stamping authority's certificate has expired")
        # as the audit trail says (an edited row raises Tampered), not as the row alone says
        status = self.authority.certificate_status(self.row["ca"], self.row["serial"])
        if status == "revoked":
            raise PolicyViolation("the time-stamping authority's certificate is revoked")
        handle = self._key()
        store, audit, actor = self.authority.store, self.authority.audit, self.authority.actor()
        with store.transaction():
            while True:
                serial = new_serial()
                if store.reserve_serial(format_serial(serial), f"tsa:{self.row['name']}",
                                        rfc3339(now)):
                    break
            audit.append(actor, "timestamp", "intent", ca=self.row["ca"],
                         key_label=handle.label, serial=format_serial(serial),
                         detail=f"{hash_name}:{imprint.hex()} {detail}".strip())
        info: dict[str, Any] = {
            "version": "v1",
            "policy": self.policy,
            "message_imprint": {"hash_algorithm": {"algorithm": hash_name}, "hashed_message": imprint},
            "serial_number": serial,
            "gen_time": now,
            "accuracy": {"seconds": 1},
        }
        if nonce is not None:
            info["nonce"] = nonce
        tst = tsp.TSTInfo(info).dump()
        digest_name = digest_name_for(handle.key_type)
        token, _sig = build_signed_data(
            handle=handle, signer=self.cert, chain=self.chain(),
            content_type="tst_info", digest=hashlib.new(digest_name, tst).digest(),
            digest_name=digest_name, when=now, content=tst, include_certificates=cert_req,
        )
        der = token.dump()
        with store.transaction():
            store.mark_serial(format_serial(serial), "issued")
            audit.append(actor, "timestamp", "issued", ca=self.row["ca"], key_label=handle.label,
                         serial=format_serial(serial),
                         object_sha256=hashlib.sha256(der).hexdigest(),
                         detail=f"{hash_name}:{imprint.hex()} {detail}".strip())
        self.authority.maybe_checkpoint()
        return der

    def respond(self, data: bytes) -> bytes:
        """A DER TimeStampResp for any input: bad requests get a rejection, never an exception."""
        try:
            if not data or len(data) > MAX_REQUEST:
                raise _Reject("bad_request", "empty or oversized request")
            req = tsp.TimeStampReq.load(data, strict=True)
            req.native  # noqa: B018 - a small structure: parse it whole so bad DER fails here
            if req["version"].native != "v1":
                raise _Reject("bad_request", "unsupported version")
            imprint = req["message_imprint"]
            hash_name = imprint["hash_algorithm"]["algorithm"].native
            hashed = imprint["hashed_message"].native
            if hash_name not in ACCEPTED_HASHES:
                raise _Reject("bad_alg", f"hash algorithm {hash_name} is not accepted")
            if len(hashed) != ACCEPTED_HASHES[hash_name]:
                raise _Reject("bad_data_format", "message imprint has the wrong length")
            policy = req["req_policy"].native
            if policy is not None and policy != self.policy:
                raise _Reject("unaccepted_policy", f"policy {policy} is not this TSA's")
            if req["extensions"].native:
                for ext in req["extensions"]:
                    if ext["critical"].native:
                        raise _Reject("unaccepted_extensions", "critical extension in request")
            nonce = req["nonce"].native
            token = self.timestamp(hash_name, hashed, nonce=nonce,
                                   cert_req=bool(req["cert_req"].native))
            resp = tsp.TimeStampResp({"status": {"status": "granted"},
                                      "time_stamp_token": tsp.ContentInfo.load(token)})
            return resp.dump()
        except _Reject as r:
            return _rejection(r.fail, r.text)
        except HsmCaError as e:
            return _rejection("system_failure", str(e), status="rejection")
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            return _rejection("bad_data_format", "malformed TimeStampReq")


class _Reject(Exception):
    def __init__(self, fail: str, text: str) -> None:
        super().__init__(text)
        self.fail, self.text = fail, text


def _rejection(fail: str, text: str, status: str = "rejection") -> bytes:
    status_info = tsp.PKIStatusInfo({
        "status": status,
        "status_string": [text[:200]],
        "fail_info": tsp.PKIFailureInfo({fail}),
    }).dump()
    # TimeStampResp ::= SEQUENCE { status, timeStampToken OPTIONAL }: asn1crypto insists on
    # the token, so the one-field SEQUENCE is wrapped here
    return b"\x30" + _der_length(len(status_info)) + status_info


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def make_request(data_digest: bytes, hash_name: str = "sha256", *, nonce: int | None = None,
                 cert_req: bool = True) -> bytes:
    """A TimeStampReq (used by code signing and tests)."""
    req: dict[str, Any] = {
        "version": "v1",
        "message_imprint": {"hash_algorithm": algos.DigestAlgorithm({"algorithm": hash_name}),
                            "hashed_message": data_digest},
        "cert_req": cert_req,
    }
    if nonce is not None:
        req["nonce"] = nonce
    return tsp.TimeStampReq(req).dump()
