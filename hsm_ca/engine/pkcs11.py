"""The PKCS#11 engine: keys on a real token (SoftHSM2, AWS CloudHSM, YubiHSM 2, Luna).

Shape of the problem, and the answers here:

- cryptography's builders hand ``sign()`` the whole to-be-signed bytes. We use
  a token's hash-and-sign mechanism when it has one (``CKM_ECDSA_SHA256``,
  ``CKM_SHA256_RSA_PKCS``, ``CKM_SHA256_RSA_PKCS_PSS``) and otherwise hash on
  the host and send the digest (``CKM_ECDSA``; ``CKM_RSA_PKCS`` over a
  DigestInfo). ECDSA's raw ``r||s`` is turned into DER. Ed25519 is ``CKM_EDDSA``.
- python-pkcs11 initialises the module without locking and releases the GIL;
  two threads in one module crash the process. Every call into a module is
  serialised by one lock per module; parallelism means processes.
- One logged-in session is reused. When the token says the user is not
  logged in or the session is gone, we open a new session and log in again;
  transient failures (CloudHSM reports throttling as CKR_FUNCTION_FAILED) are
  retried with exponential backoff.
- Keys are generated on the token with CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE
  TRUE and CKA_EXTRACTABLE FALSE, with a label and a CKA_ID derived from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from hsm_ca.config import Pkcs11Settings
from hsm_ca.engine.base import KeySpec, validate_key_type, validate_label
from hsm_ca.errors import (
    AlreadyExists,
    ConfigError,
    EngineError,
    KeyNotFound,
    LockedOut,
    LoginFailed,
    PermissionDenied,
)

try:
    import pkcs11
    from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11e
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("python-pkcs11 is not installed: pip install 'hsm-ca[pkcs11]'") from _e

T = TypeVar("T")
_LIBS: dict[str, Any] = {}
_LOCKS: dict[str, threading.RLock] = {}
_LOGINS: dict[tuple[str, str], bytes] = {}  # (module, token) -> SHA-256 of the PIN that logged in
_SESSIONS: dict[tuple[str, str], list[Any]] = {}
_GLOBAL = threading.Lock()

EC_CURVES = {"ec-p256": "secp256r1", "ec-p384": "secp384r1", "ec-p521": "secp521r1"}
CURVE_OIDS = {
    "1.2.840.10045.3.1.7": "ec-p256",
    "1.3.132.0.34": "ec-p384",
    "1.3.132.0.35": "ec-p521",
}
ED25519_OID = "1.3.101.112"
# DigestInfo prefixes (RFC 8017 section 9.2, note 1) for CKM_RSA_PKCS over a host digest
DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
HASH_MECH = {"sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}
RETRYABLE = ("FunctionFailed", "DeviceError", "DeviceMemory", "SessionCount", "GeneralError")
RELOGIN = ("UserNotLoggedIn", "SessionHandleInvalid", "SessionClosed", "DeviceRemoved",
           "TokenNotPresent", "ObjectHandleInvalid", "KeyHandleInvalid")


def ckr_name(exc: BaseException) -> str:
    """The PKCS#11 return code an exception class stands for (PinIncorrect → CKR_PIN_INCORRECT)."""
    name = type(exc).__name__
    if name in ("NoSuchKey", "NoSuchToken", "MultipleObjectsReturned", "MultipleTokensReturned"):
        return name
    return "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def parse_pkcs11_uri(uri: str) -> dict[str, str]:
    """The path attributes of an RFC 7512 ``pkcs11:`` URI (token, object, slot-id, ...)."""
    if not uri.startswith("pkcs11:"):
        raise ConfigError(f"not a PKCS#11 URI (RFC 7512): {uri!r}")
    path = uri[len("pkcs11:"):].split("?", 1)[0]
    out: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        if "=" not in part:
            raise ConfigError(f"malformed PKCS#11 URI attribute {part!r}")
        k, v = part.split("=", 1)
        out[k] = urllib.parse.unquote(v)
    return out


def _load(module: str) -> Any:
    with _GLOBAL:
        if module not in _LIBS:
            try:
                _LIBS[module] = pkcs11.lib(module)
            except (OSError, RuntimeError, p11e.PKCS11Error) as e:
                raise ConfigError(f"cannot load PKCS#11 module {module}: {e}") from e
            _LOCKS[module] = threading.RLock()
        return _LIBS[module]


def _ec_params_der(oid: str) -> bytes:
    from asn1crypto import core

    return core.ObjectIdentifier(oid).dump()


@dataclass
class Pkcs11KeyHandle:
    """A private key object on the token, found by label (and CKA_ID)."""

    label: str
    key_type: str
    extractable: bool
    _public: PublicKeyTypes
    _engine: Pkcs11Engine

    def public_key(self) -> PublicKeyTypes:
        return self._public

    def sign(self, data: bytes, algorithm: Any, padding_: Any = None) -> bytes:
        return self._engine._sign(self, data, algorithm, padding_)

    def attributes(self) -> dict[str, bool]:
        """CKA_SENSITIVE & co. as the token reports them (for checks and listings)."""
        return self._engine._attributes(self.label)


class Pkcs11Engine:
    """HSM engine over one token of a PKCS#11 module."""

    name = "pkcs11"

    def __init__(self, settings: Pkcs11Settings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        uri = parse_pkcs11_uri(settings.uri) if settings.uri else {}
        self.module = uri.get("module-path") or settings.module
        self.token_label = settings.token_label or uri.get("token")
        self.token_serial = uri.get("serial")
        if not self.token_label and not self.token_serial:
            raise ConfigError("the PKCS#11 engine needs a token label (or a pkcs11: URI with token=)")
        self._lib = _load(self.module)
        self._lock = _LOCKS[self.module]
        self._session: Any = None
        self._pin: str | None = None
        self._user: str | None = None
        self._mechs: set[str] | None = None
        self._handles: dict[str, Any] = {}
        self._sleep = sleep
        self._settings = settings
        self._helpers: dict[str, Any] = {}

    # ------------------------------------------------------------ session
    def _token(self) -> Any:
        kwargs = {"token_label": self.token_label} if self.token_label else {"token_serial": self.token_serial}
        try:
            return self._lib.get_token(**kwargs)
        except p11e.NoSuchToken:
            # a token created or plugged in after the module was initialised
            self._lib.reinitialize()
            try:
                return self._lib.get_token(**kwargs)
            except p11e.NoSuchToken as e:
                raise ConfigError(
                    f"no PKCS#11 token labelled {self.token_label!r} in {self.module}"
                ) from e

    def _open(self) -> None:
        """Open a logged-in session.

        PKCS#11 login state is per application and token, not per session, so
        a second engine in the same process finds the token logged in already.
        We then accept the session only for the PIN that logged it in; any
        other PIN closes our sessions (logging the token out) and logs in anew.
        """
        assert self._pin is not None
        token = self._token()
        key = (self.module, token.label)
        pin_hash = hashlib.sha256(self._pin.encode()).digest()
        try:
            try:
                self._session = token.open(rw=True, user_pin=self._pin)
            except p11e.UserAlreadyLoggedIn:
                if _LOGINS.get(key) == pin_hash:
                    self._session = token.open(rw=True)
                else:
                    for other in _SESSIONS.pop(key, []):
                        with contextlib.suppress(p11e.PKCS11Error):
                            other.close()
                    self._session = token.open(rw=True, user_pin=self._pin)
            _LOGINS[key] = pin_hash
            _SESSIONS.setdefault(key, []).append(self._session)
        except p11e.PinIncorrect as e:
            raise LoginFailed(f"wrong PIN for PKCS#11 token {token.label!r} (CKR_PIN_INCORRECT)") from e
        except p11e.PinLocked as e:
            raise LockedOut(f"the user PIN of PKCS#11 token {token.label!r} is locked (CKR_PIN_LOCKED)") from e
        except (p11e.PinLenRange, p11e.PinInvalid) as e:
            raise LoginFailed(f"PIN rejected by PKCS#11 token {token.label!r} ({ckr_name(e)})") from e
        except p11e.PKCS11Error as e:
            raise EngineError(f"cannot log in to PKCS#11 token {token.label!r}: {ckr_name(e)}") from e
        self._mechs = {m.name for m in token.slot.get_mechanisms()}
        self._handles.clear()

    def login(self, user: str, pin: str) -> None:
        """Log in as the token's user. ``user`` is informational: PKCS#11 has one user role
        (CloudHSM puts the crypto user's name in the PIN: ``user:password``)."""
        with self._lock:
            self.logout()
            self._pin = pin
            self._user = user
            try:
                self._open()
            except BaseException:
                self._pin = None
                raise

    def signing_helper(self, label: str) -> Any:
        """The helper process that signs with ``label`` for large batches, started on first use.

        Returns None when helpers are turned off (``signing_helper = false``), when
        not logged in, or when the helper for this key has failed once: the caller
        then signs in this process. Starting does not wait for the helper's login;
        ``ready()`` says when it can take work.
        """
        if not self._settings.signing_helper or self._pin is None:
            return None
        helper = self._helpers.get(label)
        if helper is None:
            from hsm_ca.engine.p11_helper import SigningHelper

            settings = {"module": self.module, "token_label": self.token_label,
                        "uri": self._settings.uri}
            try:
                helper = SigningHelper(settings, self._user or "", self._pin, label)
            except OSError:
                return None
            self._helpers[label] = helper
        return None if helper.broken else helper

    def _close_helpers(self) -> None:
        helpers, self._helpers = list(self._helpers.values()), {}
        for helper in helpers:
            helper.close()

    def logout(self) -> None:
        self._close_helpers()
        with self._lock:
            if self._session is not None:
                for sessions in _SESSIONS.values():
                    if self._session in sessions:
                        sessions.remove(self._session)
                with contextlib.suppress(p11e.PKCS11Error):
                    self._session.close()
            self._session = None
            self._handles.clear()

    def close(self) -> None:
        self.logout()
        self._pin = None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one token operation: serialised, re-logged-in and retried as needed."""
        if self._pin is None:
            raise PermissionDenied("not logged in to the PKCS#11 token")
        delay = 0.05
        relogged = False
        for attempt in range(5):
            with self._lock:
                try:
                    if self._session is None:
                        self._open()
                    return fn()
                except p11e.PKCS11Error as e:
                    name = type(e).__name__
                    if name in RELOGIN and not relogged:
                        relogged = True
                        self._session = None
                        self._handles.clear()
                        continue
                    if name in RETRYABLE:
                        if attempt == 4:
                            raise EngineError(
                                f"{what} failed on the PKCS#11 token after 5 attempts: {ckr_name(e)}"
                            ) from e
                        # else back off outside the lock
                    elif isinstance(e, p11e.MechanismInvalid):
                        raise EngineError(f"{what}: the token does not support the mechanism ({ckr_name(e)})") from e
                    else:
                        raise EngineError(f"{what} failed on the PKCS#11 token: {ckr_name(e)}") from e
            self._sleep(delay)
            delay *= 4
        raise EngineError(f"{what} failed on the PKCS#11 token after retries")

    # ---------------------------------------------------------------- keys
    @staticmethod
    def _key_id(label: str) -> bytes:
        return hashlib.sha256(b"hsm-ca:" + label.encode()).digest()[:16]

    def _find(self, label: str, cls: Any) -> Any:
        try:
            return self._session.get_key(object_class=cls, label=label, id=self._key_id(label))
        except p11e.NoSuchKey:
            try:  # keys made by other tools (pkcs11-tool, CloudHSM CLI) have their own IDs
                return self._session.get_key(object_class=cls, label=label)
            except p11e.NoSuchKey:
                return None
        except p11e.MultipleObjectsReturned as e:
            raise EngineError(f"several {cls.name} objects labelled {label!r} on the token") from e

    def _public_of(self, pub: Any, key_type: str) -> PublicKeyTypes:
        if key_type.startswith("ec-"):
            from pkcs11.util.ec import encode_ec_public_key

            return serialization.load_der_public_key(encode_ec_public_key(pub))
        if key_type.startswith("rsa-"):
            from pkcs11.util.rsa import encode_rsa_public_key

            return serialization.load_der_public_key(encode_rsa_public_key(pub))
        from asn1crypto import core

        point = pub[Attribute.EC_POINT]
        try:
            raw = core.OctetString.load(point).native
        except ValueError:
            raw = point
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes(raw))

    def _key_type_of(self, obj: Any) -> str:
        kt = obj[Attribute.KEY_TYPE]
        if kt == KeyType.RSA:
            try:
                bits = obj[Attribute.MODULUS_BITS]
            except p11e.PKCS11Error:
                bits = len(obj[Attribute.MODULUS]) * 8
            return f"rsa-{bits}"
        if kt == KeyType.EC:
            from asn1crypto import core

            oid = core.ObjectIdentifier.load(obj[Attribute.EC_PARAMS]).dotted
            return CURVE_OIDS.get(oid, f"ec-{oid}")
        if kt == KeyType.EC_EDWARDS:
            return "ed25519"
        return f"unknown-{kt}"

    def _handle_for(self, label: str) -> Pkcs11KeyHandle:
        priv = self._find(label, ObjectClass.PRIVATE_KEY)
        if priv is None:
            raise KeyNotFound(f"no private key labelled {label!r} on the PKCS#11 token")
        pub = self._find(label, ObjectClass.PUBLIC_KEY)
        if pub is None:
            raise KeyNotFound(f"no public key object labelled {label!r} on the PKCS#11 token")
        key_type = self._key_type_of(priv)
        extractable = bool(priv[Attribute.EXTRACTABLE])
        self._handles[label] = priv
        return Pkcs11KeyHandle(label, key_type, extractable, self._public_of(pub, key_type), self)

    def generate_key(self, spec: KeySpec) -> Pkcs11KeyHandle:
        validate_key_type(spec.key_type)
        validate_label(spec.label)
        if spec.extractable:
            raise PermissionDenied("hsm-ca only generates non-extractable keys")
        key_id = self._key_id(spec.label)
        private_template = {
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
            Attribute.UNWRAP: False, Attribute.DERIVE: False,
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                           Attribute.WRAP: False}

        def gen() -> Pkcs11KeyHandle:
            if self._find(spec.label, ObjectClass.PRIVATE_KEY) is not None:
                raise AlreadyExists(f"a key labelled {spec.label!r} already exists on the token")
            kt = spec.key_type
            mechs = self._mechs or set()
            common = {"store": True, "label": spec.label, "id": key_id,
                      "public_template": public_template, "private_template": private_template}
            if kt.startswith("rsa-"):
                self._need("RSA_PKCS_KEY_PAIR_GEN", kt)
                self._session.generate_keypair(KeyType.RSA, int(kt[4:]), **common)
            elif kt.startswith("ec-"):
                self._need("EC_KEY_PAIR_GEN", kt, alt="ECDSA_KEY_PAIR_GEN")
                from pkcs11.util.ec import encode_named_curve_parameters

                params = self._session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(EC_CURVES[kt])},
                    local=True,
                )
                params.generate_keypair(**common)
            else:
                self._need("EC_EDWARDS_KEY_PAIR_GEN", kt)
                params = self._session.create_domain_parameters(
                    KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ec_params_der(ED25519_OID)}, local=True,
                )
                params.generate_keypair(mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **common)
            del mechs
            return self._handle_for(spec.label)

        return self._call(f"generating {spec.key_type} key {spec.label!r}", gen)

    def _need(self, mech: str, key_type: str, alt: str | None = None) -> None:
        mechs = self._mechs or set()
        if mech not in mechs and (alt is None or alt not in mechs):
            raise EngineError(f"the PKCS#11 token does not offer CKM_{mech}, needed for {key_type} keys")

    def get_key(self, label: str) -> Pkcs11KeyHandle:
        return self._call(f"finding key {label!r}", lambda: self._handle_for(label))

    def list_keys(self) -> list[Pkcs11KeyHandle]:
        def run() -> list[Pkcs11KeyHandle]:
            out = []
            # finish the search before looking objects up: PKCS#11 allows one search at a time
            labels = [obj[Attribute.LABEL] for obj in
                      self._session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})]
            for label in labels:
                try:
                    out.append(self._handle_for(label))
                except (KeyNotFound, EngineError):
                    continue
            return sorted(out, key=lambda h: h.label)

        return self._call("listing keys", run)

    def destroy_key(self, label: str) -> None:
        def run() -> None:
            found = False
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                obj = self._find(label, cls)
                if obj is not None:
                    obj.destroy()
                    found = True
            if not found:
                raise KeyNotFound(f"no key labelled {label!r} on the PKCS#11 token")
            self._handles.pop(label, None)

        self._call(f"destroying key {label!r}", run)

    def _attributes(self, label: str) -> dict[str, bool]:
        def run() -> dict[str, bool]:
            priv = self._find(label, ObjectClass.PRIVATE_KEY)
            if priv is None:
                raise KeyNotFound(label)
            return {name: bool(priv[getattr(Attribute, name)]) for name in
                    ("TOKEN", "PRIVATE", "SENSITIVE", "ALWAYS_SENSITIVE", "EXTRACTABLE",
                     "NEVER_EXTRACTABLE")}

        return self._call(f"reading attributes of {label!r}", run)

    # ------------------------------------------------------------- signing
    def _sign(self, handle: Pkcs11KeyHandle, data: bytes, algorithm: Any, padding_: Any) -> bytes:
        kt = handle.key_type

        def run() -> bytes:
            priv = self._handles.get(handle.label)
            if priv is None:
                priv = self._find(handle.label, ObjectClass.PRIVATE_KEY)
                if priv is None:
                    raise KeyNotFound(f"no private key labelled {handle.label!r} on the token")
                self._handles[handle.label] = priv
            mechs = self._mechs or set()
            if kt == "ed25519":
                self._need("EDDSA", kt)
                return bytes(priv.sign(data, mechanism=Mechanism.EDDSA))
            prehashed = isinstance(algorithm, asym_utils.Prehashed)
            hash_alg = algorithm._algorithm if prehashed else algorithm
            hname = hash_alg.name
            if hname not in HASH_MECH:
                raise EngineError(f"unsupported signature hash {hname}")
            digest = data if prehashed else _digest(hash_alg, data)
            if kt.startswith("ec-"):
                combined = f"ECDSA_{HASH_MECH[hname]}"
                if not prehashed and combined in mechs:
                    raw = priv.sign(data, mechanism=getattr(Mechanism, combined))
                else:
                    self._need("ECDSA", kt)
                    raw = priv.sign(digest, mechanism=Mechanism.ECDSA)
                raw = bytes(raw)
                half = len(raw) // 2
                return asym_utils.encode_dss_signature(
                    int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
            if isinstance(padding_, padding.PSS):
                salt = padding_._salt_length
                if not isinstance(salt, int):  # DIGEST_LENGTH / AUTO / MAX: use the hash length
                    salt = hash_alg.digest_size
                param = (getattr(Mechanism, HASH_MECH[hname]), getattr(MGF, HASH_MECH[hname]), salt)
                combined = f"{HASH_MECH[hname]}_RSA_PKCS_PSS"
                if not prehashed and combined in mechs:
                    return bytes(priv.sign(data, mechanism=getattr(Mechanism, combined),
                                           mechanism_param=param))
                self._need("RSA_PKCS_PSS", kt)
                return bytes(priv.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=param))
            combined = f"{HASH_MECH[hname]}_RSA_PKCS"
            if not prehashed and combined in mechs:
                return bytes(priv.sign(data, mechanism=getattr(Mechanism, combined)))
            self._need("RSA_PKCS", kt)
            return bytes(priv.sign(DIGEST_INFO[hname] + digest, mechanism=Mechanism.RSA_PKCS))

        return self._call(f"signing with {handle.label!r}", run)


def _digest(alg: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(alg)
    h.update(data)
    return h.finalize()
