"""Pre-issuance linting with pkilint (optional extra ``hsm-ca[lint]``).

Before the HSM signs, the exact to-be-signed structure is signed with a
throwaway key of the issuer's type and linted (as Let's Encrypt does); after
the HSM signs, the real TBS must be byte-identical to the linted one. So a
certificate or CRL that pkilint would flag is refused before the CA key ever
touches it.
"""

from __future__ import annotations

import functools
from typing import Any

from hsm_ca.errors import ConfigError

BLOCKING = ("FATAL", "ERROR", "WARNING")


def _pkilint() -> Any:
    try:
        import pkilint  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "this profile asks for pre-issuance linting, which needs pkilint: "
            "pip install 'hsm-ca[lint]'"
        ) from e
    return pkilint


@functools.cache
def throwaway_key(key_type: str) -> Any:
    """One ephemeral key per type and process; it signs only what is linted, then dies."""
    from hsm_ca.engine.keys import new_software_key

    return new_software_key(key_type)


def _blocking(results: Any) -> list[str]:
    out = []
    for result in results:
        for fd in result.finding_descriptions:
            severity = fd.finding.severity.name
            if severity in BLOCKING:
                out.append(f"{severity} {fd.finding.code}")
    return out


@functools.cache
def _cert_validator(cabf_serverauth: bool) -> Any:
    _pkilint()
    from pkilint.pkix import certificate, extension, name

    if cabf_serverauth:
        from pkilint.cabf import serverauth
        from pkilint.cabf.serverauth import serverauth_constants

        kind = serverauth_constants.CertificateType.DV_FINAL_CERTIFICATE
        return (certificate.create_pkix_certificate_validator_container(
            serverauth.create_decoding_validators(), serverauth.create_validators(kind)),
            serverauth.create_serverauth_finding_filters(kind))
    return (certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS,
                                               extension.EXTENSION_MAPPINGS),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    ), None)


def lint_certificate(der: bytes, *, cabf_serverauth: bool) -> list[str]:
    """Blocking findings (WARNING and worse) for a DER certificate."""
    _pkilint()
    from pkilint import finding_filter, loader

    validator, filters = _cert_validator(cabf_serverauth)
    doc = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "tbs")
    results = validator.validate(doc.root)
    if filters is not None:
        results, _ = finding_filter.filter_results(filters, results)
    return _blocking(results)


@functools.cache
def _crl_validator() -> Any:
    _pkilint()
    from pkilint import pkix
    from pkilint.pkix import crl, extension, name

    return crl.create_pkix_crl_validator_container(
        [pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
         pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS)],
        [crl.create_issuer_validator_container([]), crl.create_validity_validator_container([]),
         crl.create_extensions_validator_container([])],
    )


def lint_crl(der: bytes) -> list[str]:
    """Blocking findings (WARNING and worse) for a DER CRL."""
    _pkilint()
    from pkilint import loader

    doc = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "tbs")
    return _blocking(_crl_validator().validate(doc.root))
