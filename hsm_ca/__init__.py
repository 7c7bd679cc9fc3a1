"""hsm-ca: a private certificate authority whose keys never leave an HSM engine.

The public Python API, for scripts that do what the CLI does::

    import hsm_ca

    with hsm_ca.open_home("~/pki", pin="...") as ca:          # or pin from $HSM_CA_PIN
        ca.create_root("root", hsm_ca.parse_dn("CN=Root,C=NL"), key_type="ec-p384")
        ca.create_intermediate("issuing", "root", hsm_ca.parse_dn("CN=Issuing,C=NL"))
        cert = ca.ca("issuing").issue(open("web.csr", "rb").read(), "tls-server")
        ca.revoke(cert.serial, "superseded")
        crl = ca.crl("issuing")

Errors are ``HsmCaError`` subclasses. Names are imported lazily so that
``import hsm_ca`` (and ``hsm-ca --help``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Authority": "hsm_ca.authority",
    "CertificateAuthority": "hsm_ca.authority",
    "CaRecord": "hsm_ca.authority",
    "IssuedCertificate": "hsm_ca.authority",
    "Refusal": "hsm_ca.authority",
    "parse_dn": "hsm_ca.policy",
    "HsmCaError": "hsm_ca.errors",
    "ConfigError": "hsm_ca.errors",
    "NotFound": "hsm_ca.errors",
    "AlreadyExists": "hsm_ca.errors",
    "EngineError": "hsm_ca.errors",
    "LoginFailed": "hsm_ca.errors",
    "LockedOut": "hsm_ca.errors",
    "Tampered": "hsm_ca.errors",
    "PolicyViolation": "hsm_ca.errors",
    "CsrRejected": "hsm_ca.errors",
    "ProfileNotFound": "hsm_ca.errors",
    "AuditIntegrityError": "hsm_ca.errors",
    "BootstrapError": "hsm_ca.bootstrap",
}

__all__ = [
    "__version__",
    "init_home",
    "open_home",
    "run_bootstrap",
    *sorted(_EXPORTS),
]

if TYPE_CHECKING:
    from pathlib import Path

    from hsm_ca.authority import Authority
    from hsm_ca.bootstrap import Plan


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hsm_ca' has no attribute {name!r}")


def _pin_getter(pin: str | None, kind: str = "user") -> Any:
    from hsm_ca.config import pin_source

    if pin is not None:
        return lambda: pin
    return pin_source(kind, None)


def open_home(home: str | Path | None = None, *, pin: str | None = None) -> Authority:
    """Open an existing home (``home`` or ``$HSM_CA_HOME`` or ``~/.hsm-ca``).

    The PIN is asked of the engine only when a key is first needed; without
    ``pin`` it comes from ``$HSM_CA_PIN``.
    """
    from hsm_ca.authority import Authority
    from hsm_ca.config import load_config, resolve_home

    return Authority(load_config(resolve_home(str(home) if home else None)), pin=_pin_getter(pin))


def init_home(home: str | Path, *, user_pin: str, officer_pin: str | None = None,
              engine: str = "soft", base_url: str | None = None, **options: Any) -> Authority:
    """Create a new home, as ``hsm-ca init`` does; refuses if one exists."""
    from pathlib import Path

    from hsm_ca.authority import Authority
    from hsm_ca.config import validate_base_url

    return Authority.initialize(
        Path(home).expanduser(), engine=engine, user_pin=user_pin, officer_pin=officer_pin,
        base_url=validate_base_url(base_url) if base_url else None, **options,
    )


def run_bootstrap(authority: Authority, path: str | Path, *, plan_only: bool = False) -> Plan:
    """Apply (or, with ``plan_only``, just plan) a bootstrap file against an open home."""
    bs = importlib.import_module("hsm_ca.bootstrap")

    existing = {r["name"]: r["parent"] for r in authority.store.list_cas()}
    spec = bs.load_spec(path, authority.profiles, existing)
    return bs.plan(authority, spec) if plan_only else bs.apply(authority, spec)
