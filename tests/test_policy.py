"""Tests for hsm_ca.policy: every refusal a hostile or mistaken CSR should meet.

Keys and CSRs are generated here (nothing committed). Where cryptography will
not build a bad request for us (SHA-1 signatures, duplicate extensions,
oversized keys), it is assembled from DER by the small helpers below, and each
such helper is also shown to produce an *accepted* request when fed good
parts, so the refusal tests cannot pass by accident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import ipaddress
import pathlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, x25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsm_ca import policy
from hsm_ca.errors import CsrRejected, UsageError
from hsm_ca.policy import (
    CheckedRequest,
    check_request,
    csr_sha256,
    load_csr,
    normalize_dns_name,
    parse_dn,
)
from hsm_ca.profiles import Profile, ProfileStore

# --------------------------------------------------------------------------- fixtures


ALL_KEY_TYPES = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")


@functools.cache
def shipped(name: str) -> Profile:
    return ProfileStore(None).get(name)


@functools.cache
def profile(name: str) -> Profile:
    """Shipped profiles with the fields these tests rely on pinned.

    The shipped TOML files are tuned over time; pinning keeps these tests about
    the policy code, while the ``shipped`` tests check the real files.
    """
    pinned = {
        "tls-server": dict(
            is_ca=False,
            key_types=("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"),
            san_kinds=frozenset({"dns", "ip"}),
            san_required=True,
            max_sans=100,
            subject_attributes=("CN",),
            cn_in_san=True,
        ),
        "tls-client": dict(
            is_ca=False,
            key_types=ALL_KEY_TYPES,
            san_kinds=frozenset({"dns", "email", "uri"}),
            san_required=False,
            max_sans=20,
            subject_attributes=("CN", "O", "OU", "C", "L", "ST", "emailAddress", "serialNumber"),
            cn_in_san=False,
        ),
        "ocsp-signing": dict(
            is_ca=False,
            key_types=ALL_KEY_TYPES,
            san_kinds=frozenset(),
            san_required=False,
            max_sans=0,
            subject_attributes=("CN", "O", "OU", "C"),
            cn_in_san=False,
        ),
        "intermediate-ca": dict(
            is_ca=True,
            key_types=ALL_KEY_TYPES,
            san_kinds=frozenset(),
            san_required=False,
            subject_attributes=None,
            cn_in_san=False,
        ),
        "root-ca": dict(
            is_ca=True,
            key_types=ALL_KEY_TYPES,
            san_kinds=frozenset(),
            san_required=False,
            subject_attributes=None,
            cn_in_san=False,
        ),
    }
    return dataclasses.replace(shipped(name), **pinned[name])


@functools.cache
def key(kind: str):
    """Keys are costly to make (RSA), so each kind is made once per run."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ec-k256":
        return ec.generate_private_key(ec.SECP256K1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if kind == "dsa":
        return dsa.generate_private_key(2048)
    if kind == "rsa-e3":
        return rsa.generate_private_key(3, 2048)
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    raise AssertionError(kind)


def cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def make_csr(
    k=None,
    *,
    subject: list | None = None,
    sans: list[x509.GeneralName] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
    algorithm: hashes.HashAlgorithm | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR; ``subject`` items are NameAttributes or whole RDNs."""
    k = k if k is not None else key("ec-p256")
    rdns = [
        item
        if isinstance(item, x509.RelativeDistinguishedName)
        else x509.RelativeDistinguishedName([item])
        for item in (subject if subject is not None else [cn("www.example.com")])
    ]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(rdns))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    if algorithm is None and not isinstance(k, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = hashes.SHA256()
    return builder.sign(k, algorithm)


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def reject(csr: x509.CertificateSigningRequest, profile_name: str, match: str) -> str:
    return reject_with(csr, profile(profile_name), match)


def reject_with(csr: x509.CertificateSigningRequest, p: Profile, match: str) -> str:
    with pytest.raises(CsrRejected, match=match) as info:
        check_request(csr, p)
    return str(info.value)


# --------------------------------------------------------------------------- DER surgery


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_len(len(content)) + content


def children(data: bytes) -> list[bytes]:
    """Split the content of a constructed DER value into its whole child TLVs."""
    _, header = read_header(data, 0)
    out, pos = [], header
    while pos < len(data):
        length, hdr = read_header(data, pos)
        out.append(data[pos : pos + hdr + length])
        pos += hdr + length
    return out


def read_header(data: bytes, pos: int) -> tuple[int, int]:
    """(content length, header length) of the TLV at ``pos``."""
    first = data[pos + 1]
    if first < 0x80:
        return first, 2
    n = first & 0x7F
    return int.from_bytes(data[pos + 2 : pos + 2 + n], "big"), 2 + n


def assemble(tbs: bytes, algorithm_id: bytes, signature: bytes) -> x509.CertificateSigningRequest:
    return x509.load_der_x509_csr(tlv(0x30, tbs + algorithm_id + tlv(0x03, b"\x00" + signature)))


SHA1_RSA = bytes.fromhex("300d06092a864886f70d0101050500")
MD5_RSA = bytes.fromhex("300d06092a864886f70d0101040500")
SHA256_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")
SHA1_ECDSA = bytes.fromhex("300906072a8648ce3d0401")
SHA256_ECDSA = bytes.fromhex("300a06082a8648ce3d040302")


def rsa_signed(tbs: bytes, algorithm_id: bytes, h: hashes.HashAlgorithm):
    return assemble(tbs, algorithm_id, key("rsa-2048").sign(tbs, padding.PKCS1v15(), h))


def ec_signed(tbs: bytes, algorithm_id: bytes, h: hashes.HashAlgorithm):
    return assemble(tbs, algorithm_id, key("ec-p256").sign(tbs, ec.ECDSA(h)))


def with_public_key(public_key_der: bytes) -> x509.CertificateSigningRequest:
    """A good CSR with its SubjectPublicKeyInfo swapped (so its signature no longer fits)."""
    good = make_csr(key("rsa-2048"))
    parts = children(good.tbs_certrequest_bytes)
    parts[2] = public_key_der
    outer = children(der(good))
    return x509.load_der_x509_csr(tlv(0x30, tlv(0x30, b"".join(parts)) + outer[1] + outer[2]))


def rsa_spki(n: int, e: int) -> bytes:
    def integer(v: int) -> bytes:
        return tlv(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))

    algorithm = tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    return tlv(0x30, algorithm + tlv(0x03, b"\x00" + tlv(0x30, integer(n) + integer(e))))


def spki_of(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- load_csr


def test_load_pem_with_surrounding_whitespace_and_crlf():
    csr = make_csr()
    text = b"\r\n  \t" + pem(csr).replace(b"\n", b"\r\n") + b"\n\n  "
    assert der(load_csr(text, "req.pem")) == der(csr)


def test_load_new_certificate_request_header():
    csr = make_csr()
    text = pem(csr).replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
    assert b"NEW CERTIFICATE REQUEST" in text
    assert der(load_csr(text)) == der(csr)


def test_load_der_and_fingerprint_agree_with_pem():
    csr = make_csr()
    from_der = load_csr(der(csr))
    assert der(from_der) == der(csr)
    expected = hashlib.sha256(der(csr)).hexdigest()
    assert csr_sha256(load_csr(pem(csr))) == expected
    assert csr_sha256(der(csr)) == expected


def test_load_der_ending_in_whitespace_bytes_is_not_stripped():
    # DER may legitimately end in 0x0a/0x20; stripping it as "whitespace" would break it.
    # ECDSA signatures are random, so about 1 in 64 CSRs ends in such a byte;
    # not finding one in 3000 tries has a probability of about e**-47.
    for _ in range(3000):
        csr = make_csr()
        if der(csr)[-1] in b" \t\r\n":
            assert der(load_csr(der(csr))) == der(csr)
            return
    raise AssertionError("no CSR ending in a whitespace byte came up")


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n"])
def test_load_empty(data):
    with pytest.raises(CsrRejected, match=r"^my\.csr is empty$"):
        load_csr(data, "my.csr")


def self_signed_certificate() -> x509.Certificate:
    k = key("ec-p256")
    name = x509.Name([cn("test")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(k, hashes.SHA256())
    )


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_load_certificate_instead_of_csr(encoding):
    data = self_signed_certificate().public_bytes(encoding)
    with pytest.raises(
        CsrRejected, match=r"^cert\.pem is a certificate, not a certificate signing request$"
    ):
        load_csr(data, "cert.pem")


@pytest.mark.parametrize(
    ("fmt", "encryption"),
    [
        (serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        (serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()),
        (serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")),
    ],
)
def test_load_private_key_pem_is_named_and_not_echoed(fmt, encryption):
    data = key("ec-p256").private_bytes(serialization.Encoding.PEM, fmt, encryption)
    with pytest.raises(CsrRejected, match="private key") as info:
        load_csr(b"\n" + data, "key.pem")
    message = str(info.value)
    assert message.startswith("key.pem ")
    body = b"".join(data.splitlines()[1:-1]).decode()
    for chunk in (body[i : i + 8] for i in range(0, len(body) - 8, 8)):
        assert chunk not in message
    assert "BEGIN" not in message


def test_load_private_key_der_is_named():
    data = key("ec-p256").private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(CsrRejected, match=r"^key\.der is a private key"):
        load_csr(data, "key.der")


@pytest.mark.parametrize(
    "data",
    [
        b"hello world",
        b"\x30\x03\x02\x01\x00",
        b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!!\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n",
        b"\x00" * 64,
    ],
)
def test_load_garbage(data):
    with pytest.raises(
        CsrRejected, match=r"^in\.csr is not a PEM or DER PKCS#10 certificate signing request"
    ):
        load_csr(data, "in.csr")


def test_load_other_pem_block_names_it():
    data = (
        key("ec-p256")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(CsrRejected, match=r"not a PEM or DER .*'PUBLIC KEY'"):
        load_csr(data, "pub.pem")


def test_load_der_with_trailing_garbage():
    with pytest.raises(CsrRejected, match="is not a PEM or DER"):
        load_csr(der(make_csr()) + b"\x00\x00", "x")


def test_load_two_csrs_refused():
    with pytest.raises(CsrRejected, match="contains 2 certificate signing requests"):
        load_csr(pem(make_csr()) + pem(make_csr()), "two.pem")


def test_load_too_large_refused_before_parsing():
    data = pem(make_csr()) + b" " * (1024 * 1024)
    with pytest.raises(CsrRejected, match=r"^big\.csr is too large"):
        load_csr(data, "big.csr")
    # Just under the limit, the same padding is fine.
    assert load_csr(pem(make_csr()) + b" " * 1000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=2048),
        # Also reach the PEM path, including its base64 and DER decoding.
        st.builds(
            lambda body, end: b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + end,
            st.binary(max_size=1024),
            st.sampled_from([b"", b"\n-----END CERTIFICATE REQUEST-----\n"]),
        ),
    )
)
def test_load_arbitrary_bytes_only_raise_csr_rejected(data):
    with contextlib.suppress(CsrRejected):
        load_csr(data)


GOOD_DER = der(make_csr(sans=[x509.DNSName("a.example.com")]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(GOOD_DER) - 1), st.integers(1, 255), st.integers(0, 3))
def test_mutated_csr_only_raises_csr_rejected(position, xor, truncate):
    data = bytearray(GOOD_DER)
    data[position] ^= xor
    data = bytes(data[: len(data) - truncate])
    # A flip the signature does not cover may pass; anything else is a CsrRejected.
    with contextlib.suppress(CsrRejected):
        check_request(load_csr(data), profile("tls-server"))


# --------------------------------------------------------------------------- keys & signatures


@pytest.mark.parametrize(
    ("kind", "profile_name"),
    [
        ("ec-p256", "tls-server"),
        ("ec-p384", "tls-server"),
        ("rsa-2048", "tls-server"),
        ("ed25519", "tls-client"),
    ],
)
def test_good_request_accepted(kind, profile_name):
    csr = make_csr(key(kind), sans=[x509.DNSName("www.example.com")])
    checked = check_request(load_csr(pem(csr)), profile(profile_name))
    assert isinstance(checked, CheckedRequest)
    assert checked.key_type == kind
    assert checked.public_key == key(kind).public_key()
    assert checked.csr_sha256 == hashlib.sha256(der(csr)).hexdigest()
    assert checked.sans == (x509.DNSName("www.example.com"),)


def test_key_type_not_in_profile():
    message = reject(
        make_csr(key("ed25519"), sans=[x509.DNSName("a.example.com")]),
        "tls-server",
        "key type ed25519 is not allowed by profile tls-server; allowed: ec-p256, ec-p384,",
    )
    assert "rsa-4096" in message


def test_odd_rsa_size_gets_its_own_key_type_and_is_refused():
    reject(make_csr(key("rsa-2304")), "root-ca", "key type rsa-2304 is not allowed")


@pytest.mark.parametrize("kind", ["ec-p256", "rsa-2048"])
def test_broken_signature(kind):
    data = bytearray(der(make_csr(key(kind))))
    data[-3] ^= 0x01  # inside the signature value (ECDSA's s, or RSA's block)
    reject(
        load_csr(bytes(data)),
        "tls-server",
        r"^CSR signature does not verify \(no proof of possession\)$",
    )


def test_der_helpers_make_an_acceptable_csr():
    """Guards the SHA-1/MD5 tests below: the same surgery with SHA-256 passes."""
    tbs = make_csr(key("rsa-2048")).tbs_certrequest_bytes
    assert check_request(rsa_signed(tbs, SHA256_RSA, hashes.SHA256()), profile("tls-server"))
    tbs = make_csr(key("ec-p256")).tbs_certrequest_bytes
    assert check_request(ec_signed(tbs, SHA256_ECDSA, hashes.SHA256()), profile("tls-server"))


def test_cryptography_refuses_to_sign_sha1_csrs():
    # Documents why the SHA-1 requests below are hand-assembled.
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        make_csr(algorithm=hashes.SHA1())


@pytest.mark.parametrize(
    ("signer", "kind", "algorithm_id", "h", "shown"),
    [
        (rsa_signed, "rsa-2048", SHA1_RSA, hashes.SHA1(), "SHA1"),
        (rsa_signed, "rsa-2048", MD5_RSA, hashes.MD5(), "MD5"),
        (ec_signed, "ec-p256", SHA1_ECDSA, hashes.SHA1(), "SHA1"),
    ],
)
def test_weak_signature_hash_refused(signer, kind, algorithm_id, h, shown):
    csr = signer(make_csr(key(kind)).tbs_certrequest_bytes, algorithm_id, h)
    reject(csr, "tls-server", f"CSR is signed with {shown}, which is not accepted")


def test_rsa_pss_signature_accepted():
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([cn("a.example.com")]))
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    csr = builder.sign(key("rsa-2048"), hashes.SHA256(), rsa_padding=pss)
    assert check_request(csr, profile("tls-server")).key_type == "rsa-2048"


def test_sha224_refused():
    reject(make_csr(algorithm=hashes.SHA224()), "tls-server", "signed with SHA224")


@pytest.mark.parametrize("h", [hashes.SHA384(), hashes.SHA512()])
def test_strong_hashes_accepted(h):
    assert check_request(make_csr(algorithm=h), profile("tls-server"))


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("rsa-1024", r"RSA key of 1024 bits is too small \(minimum 2048\)"),
        ("rsa-e3", "RSA public exponent '3' is not allowed"),
        ("dsa", "DSA keys are not accepted"),
        ("ed448", "Ed448 keys are not accepted"),
        ("ec-k256", "EC curve secp256k1 is not allowed"),
    ],
)
def test_weak_or_unsupported_keys_refused(kind, match):
    csr = make_csr(key(kind), algorithm=None if kind == "ed448" else hashes.SHA256())
    reject(csr, "root-ca", match)


def test_spki_swap_helper_keeps_csr_parsable():
    csr = with_public_key(spki_of(key("rsa-2048").public_key()))
    assert (
        der(csr) == der(make_csr(key("rsa-2048")))
        or csr.public_key() == key("rsa-2048").public_key()
    )


def test_oversized_rsa_key_refused():
    big = rsa.RSAPublicNumbers(65537, (1 << 9000) | 1).public_key()
    reject(with_public_key(spki_of(big)), "root-ca", "RSA key of 9001 bits is too large")


def test_even_rsa_exponent_refused():
    csr = with_public_key(rsa_spki((1 << 2047) | 1, 65538))
    reject(csr, "root-ca", "public key cannot be parsed: 'e must be odd|RSA public exponent")


def test_x25519_key_refused():
    csr = with_public_key(spki_of(x25519.X25519PrivateKey.generate().public_key()))
    reject(csr, "root-ca", "(X25519 keys are not accepted|public key cannot be parsed)")


# --------------------------------------------------------------------------- extensions


def test_ca_true_refused_on_leaf_profile_but_not_on_ca_profile():
    ext = [(x509.BasicConstraints(ca=True, path_length=None), True)]
    reject(make_csr(extensions=ext), "tls-server", r"basicConstraints CA:TRUE.*tls-server")
    assert check_request(make_csr(extensions=ext), profile("intermediate-ca"))


def test_ca_false_is_fine():
    ext = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    assert check_request(make_csr(extensions=ext), profile("tls-server"))


def key_usage(**kw) -> x509.KeyUsage:
    flags = dict.fromkeys(
        [
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ],
        False,
    )
    flags.update(kw)
    return x509.KeyUsage(**flags)


@pytest.mark.parametrize("flag", ["key_cert_sign", "crl_sign"])
def test_ca_key_usage_refused_on_leaf_profile(flag):
    csr = make_csr(extensions=[(key_usage(**{flag: True}), True)])
    reject(csr, "tls-server", "keyCertSign/cRLSign")


def test_leaf_key_usage_fine():
    csr = make_csr(extensions=[(key_usage(digital_signature=True), True)])
    assert check_request(csr, profile("tls-server"))


def test_name_constraints_always_refused():
    nc = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
    )
    reject(make_csr(extensions=[(nc, True)]), "intermediate-ca", "nameConstraints")
    reject(make_csr(extensions=[(nc, False)]), "root-ca", "nameConstraints")


def test_unknown_critical_extension_refused_noncritical_ignored():
    oid = x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")
    unknown = x509.UnrecognizedExtension(oid, b"\x05\x00")
    reject(
        make_csr(extensions=[(unknown, True)]),
        "tls-server",
        "unsupported critical extension '1.3.6.1.4.1.99999.1'",
    )
    assert check_request(make_csr(extensions=[(unknown, False)]), profile("tls-server"))


def test_known_but_unsupported_critical_extension_refused():
    ocsp = x509.OCSPNoCheck()
    reject(make_csr(extensions=[(ocsp, True)]), "tls-server", "unsupported critical extension")


def test_critical_san_and_eku_accepted():
    eku = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    san = x509.SubjectAlternativeName([x509.DNSName("www.example.com")])
    assert check_request(make_csr(extensions=[(eku, True), (san, True)]), profile("tls-server"))


def test_duplicate_extension_refused():
    a = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00")
    b = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.6"), b"\x05\x00")
    tbs = make_csr(extensions=[(a, False), (b, False)]).tbs_certrequest_bytes
    twice = tbs.replace(bytes.fromhex("06042a030406"), bytes.fromhex("06042a030405"))
    assert twice != tbs
    assert check_request(ec_signed(tbs, SHA256_ECDSA, hashes.SHA256()), profile("tls-server"))
    reject(
        ec_signed(twice, SHA256_ECDSA, hashes.SHA256()),
        "tls-server",
        "CSR extensions cannot be parsed",
    )


def test_malformed_san_extension_refused():
    bad = x509.UnrecognizedExtension(
        x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x82\x01"
    )
    reject(make_csr(extensions=[(bad, False)]), "tls-server", "CSR extensions cannot be parsed")


# --------------------------------------------------------------------------- subject


def attr(oid, value) -> x509.NameAttribute:
    return x509.NameAttribute(oid, value, _validate=False)


@pytest.mark.parametrize("value", ["a\x00b", "evil\x1b[31m", "line\nbreak", "del\x7f"])
def test_control_characters_in_subject_refused(value):
    subject = [cn("www.example.com"), attr(NameOID.ORGANIZATION_NAME, value)]
    message = reject(make_csr(subject=subject), "tls-client", "attribute O contains a control")
    assert repr(value) in message


def test_control_character_in_dropped_attribute_still_refused():
    subject = [cn("www.example.com"), attr(NameOID.LOCALITY_NAME, "x\x00")]
    reject(make_csr(subject=subject), "tls-server", "attribute L contains a control")


def test_multiple_common_names_refused():
    reject(
        make_csr(subject=[cn("a.example.com"), cn("b.example.com")]),
        "tls-server",
        "2 common names",
    )


def test_multi_valued_rdn_refused():
    rdn = x509.RelativeDistinguishedName(
        [cn("a.example.com"), attr(NameOID.ORGANIZATION_NAME, "X")]
    )
    reject(make_csr(subject=[rdn]), "tls-client", "multi-valued RDN")


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_bad_country_and_overlong_cn_refused():
    reject(
        make_csr(subject=[attr(NameOID.COUNTRY_NAME, "Netherlands")]),
        "tls-client",
        "two-letter country code",
    )
    reject(
        make_csr(subject=[attr(NameOID.COMMON_NAME, "x" * 65)]),
        "tls-client",
        "over the limit of 64",
    )


def test_subject_filtered_to_profile_attributes_in_order():
    subject = [
        attr(NameOID.COUNTRY_NAME, "NL"),
        attr(NameOID.STREET_ADDRESS, "Main Street 1"),
        attr(NameOID.ORGANIZATION_NAME, "Example"),
        attr(NameOID.DOMAIN_COMPONENT, "example"),
        attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
        attr(NameOID.EMAIL_ADDRESS, "ops@example.com"),
        cn("Alice"),
    ]
    checked = check_request(make_csr(subject=subject), profile("tls-client"))
    assert [(a.oid, a.value) for a in checked.subject] == [
        (NameOID.COUNTRY_NAME, "NL"),
        (NameOID.ORGANIZATION_NAME, "Example"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
        (NameOID.EMAIL_ADDRESS, "ops@example.com"),
        (NameOID.COMMON_NAME, "Alice"),
    ]
    # cn_in_san is off for tls-client: the CN stays as typed and adds no SAN.
    assert checked.sans == ()


def test_subject_filter_tls_server_keeps_only_cn():
    subject = [attr(NameOID.ORGANIZATION_NAME, "Example"), cn("www.example.com")]
    checked = check_request(make_csr(subject=subject), profile("tls-server"))
    assert checked.subject == x509.Name([cn("www.example.com")])


def test_subject_kept_whole_when_profile_keeps_all():
    subject = [attr(NameOID.DOMAIN_COMPONENT, "example"), cn("Example Root")]
    checked = check_request(make_csr(subject=subject), profile("root-ca"))
    assert checked.subject == make_csr(subject=subject).subject


def test_empty_subject_allowed():
    checked = check_request(
        make_csr(subject=[], sans=[x509.DNSName("a.example.com")]), profile("tls-server")
    )
    assert checked.subject == x509.Name([])
    assert checked.sans == (x509.DNSName("a.example.com"),)


# --------------------------------------------------------------------------- SANs


HOSTILE_DNS = [
    ("a\x00b.example.com", "NUL"),
    ("a b.example.com", "whitespace"),
    ("a\tb.example.com", "whitespace"),
    ("a,b.example.com", "comma"),
    ("a..b", "empty label"),
    (".example.com", "empty label"),
    ("example.com.", "empty label"),
    ("x" * 64 + ".example.com", "longer than 63"),
    (".".join(["a" * 63] * 4) + ".ab", "longer than 253"),
    ("-a.example.com", "starting or ending with '-'"),
    ("a-.example.com", "starting or ending with '-'"),
    ("a_b.example.com", "character '_'"),
    ("a*.example.com", "wildcard"),
    ("*.*.example.com", "wildcard"),
    ("foo.*.com", "wildcard"),
    ("*", "wildcard"),
    ("*.com", "wildcard must be followed by at least two labels"),
    ("localhost", "single label"),
    ("192.168.0.1", "all-numeric"),
    ("xn--zz.example.com", "invalid A-label"),
    ("xn--a.example.com", "invalid A-label"),
]


@pytest.mark.parametrize(("name", "why"), HOSTILE_DNS)
def test_hostile_dns_san_refused(name, why):
    message = reject(make_csr(subject=[], sans=[x509.DNSName(name)]), "tls-server", why)
    assert message.startswith("subjectAltName: DNS name ")
    assert repr(name[:80]) in message


@pytest.mark.parametrize(("name", "why"), HOSTILE_DNS)
def test_hostile_dns_normalize_refused(name, why):
    with pytest.raises(CsrRejected, match=why):
        normalize_dns_name(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("WWW.Example.COM", "www.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("*.Bücher.example", "*.xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("*.example.com", "*.example.com"),
        ("a-b.c0.example", "a-b.c0.example"),
        ("x" * 63 + ".example.com", "x" * 63 + ".example.com"),
    ],
)
def test_normalize_dns_name(name, expected):
    assert normalize_dns_name(name) == expected


@pytest.mark.parametrize("name", ["a\u00adb.example", "a\u200bb.example", "a\u3000b.example"])
def test_normalize_dns_refuses_invisible_characters_idna_would_drop(name):
    with pytest.raises(CsrRejected, match="whitespace|invisible"):
        normalize_dns_name(name)


def test_normalize_dns_no_wildcard():
    with pytest.raises(CsrRejected, match="wildcard is not allowed"):
        normalize_dns_name("*.example.com", allow_wildcard=False)
    assert normalize_dns_name("www.example.com", allow_wildcard=False) == "www.example.com"


def test_long_hostile_value_truncated_in_message():
    name = "a" * 10_000
    with pytest.raises(CsrRejected) as info:
        normalize_dns_name(name)
    assert len(str(info.value)) < 300
    assert "10000 characters" in str(info.value)


def test_sans_normalized_and_deduplicated_in_order():
    sans = [
        x509.DNSName("B.example.com"),
        x509.IPAddress(ipaddress.ip_address("2001:DB8:0:0::1")),
        x509.DNSName("a.example.com"),
        x509.DNSName("b.EXAMPLE.com"),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
    ]
    checked = check_request(make_csr(subject=[], sans=sans), profile("tls-server"))
    assert checked.sans == (
        x509.DNSName("b.example.com"),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.DNSName("a.example.com"),
    )


@pytest.mark.parametrize(
    "name",
    [
        x509.DirectoryName(x509.Name([cn("x")])),
        x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
        x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x01a"),
    ],
)
def test_other_san_types_refused(name):
    reject(make_csr(sans=[name]), "tls-server", f"subjectAltName of type {type(name).__name__}")


def test_san_kind_not_in_profile():
    san = [x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]
    reject(
        make_csr(subject=[], sans=san),
        "tls-client",
        "^SAN kind ip is not allowed by profile tls-client$",
    )


def test_profile_without_san_kinds_refuses_sans():
    reject(make_csr(sans=[x509.DNSName("a.example.com")]), "ocsp-signing", "allows none")


def test_san_required():
    reject(make_csr(subject=[]), "tls-server", "requires at least one subject alternative name")


def test_3000_sans_refused_without_normalizing_any(monkeypatch):
    sans = [x509.DNSName(f"h{i}.example.com") for i in range(3000)]
    csr = make_csr(sans=sans)

    def boom(*_a, **_k):
        raise AssertionError("normalized a SAN before counting them")

    monkeypatch.setattr(policy, "normalize_dns_name", boom)
    reject(
        csr,
        "tls-server",
        "CSR has 3000 subject alternative names; profile tls-server allows at most 100",
    )


def test_max_sans_counts_the_cn():
    p = dataclasses.replace(profile("tls-server"), max_sans=1)
    csr = make_csr(subject=[cn("a.example.com")], sans=[x509.DNSName("b.example.com")])
    with pytest.raises(
        CsrRejected, match=r"2 subject alternative names \(counting the CN\).*at most 1"
    ):
        check_request(csr, p)
    same = make_csr(subject=[cn("A.example.com")], sans=[x509.DNSName("a.example.com")])
    assert len(check_request(same, p).sans) == 1


def test_email_san():
    sans = [x509.RFC822Name("Alice.Smith@Example.COM"), x509.RFC822Name("alice.smith@example.com")]
    checked = check_request(make_csr(subject=[], sans=sans), profile("tls-client"))
    # The local part keeps its case (it may be case-sensitive); the domain does not.
    assert checked.sans == (
        x509.RFC822Name("Alice.Smith@example.com"),
        x509.RFC822Name("alice.smith@example.com"),
    )


def raw_san(tag: int, value: bytes) -> tuple[x509.ExtensionType, bool]:
    """A SAN extension cryptography's GeneralName classes would refuse to build."""
    return (
        x509.UnrecognizedExtension(
            x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, tlv(0x30, tlv(tag, value))
        ),
        False,
    )


def test_raw_san_helper_builds_a_readable_san():
    csr = make_csr(subject=[], extensions=[raw_san(0x81, b"a@example.com")])
    checked = check_request(csr, profile("tls-client"))
    assert checked.sans == (x509.RFC822Name("a@example.com"),)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("no-at-sign", "no '@'"),
        ("@example.com", "1 to 64"),
        ("a" * 65 + "@example.com", "1 to 64"),
        ("a b@example.com", "contains ' '"),
        ("a<b@example.com", "contains '<'"),
        ("a\x00@example.com", "contains '\\\\x00'"),
        (".a@example.com", "misplaced dot"),
        ("a@*.example.com", "wildcard"),
        ("a@localhost", "single label"),
    ],
)
def test_bad_email_san(value, why):
    csr = make_csr(subject=[], extensions=[raw_san(0x81, value.encode("ascii"))])
    reject(csr, "tls-client", why)


def test_uri_san():
    sans = [
        x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/web"),
        x509.UniformResourceIdentifier("HTTPS://www.example.com/x"),
        x509.UniformResourceIdentifier("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"),
    ]
    checked = check_request(make_csr(subject=[], sans=sans), profile("tls-client"))
    assert [s.value for s in checked.sans] == [
        "spiffe://example.org/ns/prod/sa/web",
        "https://www.example.com/x",
        "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
    ]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("www.example.com/path", "no scheme"),
        ("//host/path", "no scheme"),
        ("https://a b/", "whitespace"),
        ("https://a/\x00", "control"),
        ("https:", "nothing after the scheme"),
        ("https:/path-only", "needs a host"),
        ("https://[::1/", "malformed"),
        ("urn:" + "x" * 2100, "longer than 2048"),
    ],
)
def test_bad_uri_san(value, why):
    reject(make_csr(subject=[], sans=[x509.UniformResourceIdentifier(value)]), "tls-client", why)


# --------------------------------------------------------------------------- CN in SAN


def test_cn_copied_into_sans_and_normalized():
    checked = check_request(make_csr(subject=[cn("WWW.Example.COM")]), profile("tls-server"))
    assert checked.sans == (x509.DNSName("www.example.com"),)
    assert checked.subject == x509.Name([cn("www.example.com")])


def test_cn_appended_after_requested_sans_and_not_duplicated():
    csr = make_csr(
        subject=[cn("b.example.com")],
        sans=[x509.DNSName("a.example.com"), x509.DNSName("B.example.com")],
    )
    assert check_request(csr, profile("tls-server")).sans == (
        x509.DNSName("a.example.com"),
        x509.DNSName("b.example.com"),
    )
    csr = make_csr(subject=[cn("c.example.com")], sans=[x509.DNSName("a.example.com")])
    assert check_request(csr, profile("tls-server")).sans == (
        x509.DNSName("a.example.com"),
        x509.DNSName("c.example.com"),
    )


def test_cn_u_label_becomes_a_label_in_cn_and_san():
    checked = check_request(make_csr(subject=[cn("Bücher.example")]), profile("tls-server"))
    assert checked.subject == x509.Name([cn("xn--bcher-kva.example")])
    assert checked.sans == (x509.DNSName("xn--bcher-kva.example"),)


@pytest.mark.parametrize(
    ("value", "normal"), [("192.0.2.1", "192.0.2.1"), ("2001:DB8::0:1", "2001:db8::1")]
)
def test_cn_ip_address_becomes_ip_san(value, normal):
    checked = check_request(make_csr(subject=[cn(value)]), profile("tls-server"))
    assert checked.sans == (x509.IPAddress(ipaddress.ip_address(normal)),)
    assert checked.subject == x509.Name([cn(normal)])


@pytest.mark.parametrize("value", ["Example Web Server", "a..example.com", "fe80::1%eth0"])
def test_cn_not_a_host_refused(value):
    reject(make_csr(subject=[cn(value)]), "tls-server", "subject CN")


def test_cn_ip_refused_when_profile_has_no_ip_kind():
    p = dataclasses.replace(profile("tls-server"), san_kinds=frozenset({"dns"}))
    with pytest.raises(CsrRejected, match="SAN of kind ip"):
        check_request(make_csr(subject=[cn("192.0.2.1")]), p)


def test_cn_dropped_by_subject_filter_is_still_moved_into_sans():
    p = dataclasses.replace(profile("tls-server"), subject_attributes=("O",))
    csr = make_csr(subject=[cn("B.example.com")], sans=[x509.DNSName("a.example.com")])
    checked = check_request(csr, p)
    assert checked.subject == x509.Name([])
    assert checked.sans == (x509.DNSName("a.example.com"), x509.DNSName("b.example.com"))
    reject_with(make_csr(subject=[cn("not a host name")]), p, "subject CN 'not a host name'")


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_kept_cn_whose_a_label_form_is_too_long_refused():
    # 59 characters typed (cryptography warns: it counts UTF-8 bytes), 73 as A-labels ...
    name = "ü" * 25 + "." + "ü" * 25 + ".example"
    assert len(name) <= 64 < len(normalize_dns_name(name))
    long_cn = attr(NameOID.COMMON_NAME, name)
    reject(make_csr(subject=[long_cn]), "tls-server", "over the CN limit of 64")
    # ... which is fine when the profile does not keep the CN.
    p = dataclasses.replace(profile("tls-server"), subject_attributes=())
    assert check_request(make_csr(subject=[long_cn]), p).sans == (
        x509.DNSName(normalize_dns_name(name)),
    )


def test_shipped_tls_server_profile():
    """The real file: names live in the SANs, and a CSR's CN is moved there."""
    p = shipped("tls-server")
    assert p.cn_in_san
    csr = make_csr(subject=[cn("WWW.example.com")], sans=[x509.DNSName("api.example.com")])
    checked = check_request(csr, p)
    assert set(checked.sans) == {x509.DNSName("api.example.com"), x509.DNSName("www.example.com")}
    if p.subject_attributes is not None and "CN" not in p.subject_attributes:
        assert checked.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    with pytest.raises(CsrRejected, match="key type ed25519 is not allowed by profile tls-server"):
        check_request(make_csr(key("ed25519"), sans=[x509.DNSName("a.example.com")]), p)


@pytest.mark.parametrize("name", ["tls-client", "code-signing", "ocsp-signing", "timestamping"])
def test_shipped_leaf_profiles_refuse_ca_requests(name):
    csr = make_csr(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])
    with pytest.raises(CsrRejected, match="not a CA profile"):
        check_request(csr, shipped(name))


# --------------------------------------------------------------------------- parse_dn


def test_parse_dn_most_specific_first():
    name = parse_dn("CN=Example Root CA,O=Example,C=NL")
    assert [(a.oid, a.value) for a in name] == [
        (NameOID.COUNTRY_NAME, "NL"),
        (NameOID.ORGANIZATION_NAME, "Example"),
        (NameOID.COMMON_NAME, "Example Root CA"),
    ]


def test_parse_dn_names_are_case_insensitive_and_country_is_upper_cased():
    name = parse_dn("cn=Root,o=Example,c=nl,emailaddress=pki@example.com,serialNumber=42")
    assert name.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "NL"
    assert name.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value == "pki@example.com"
    assert name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "42"


def test_parse_dn_escaped_comma():
    name = parse_dn(r"CN=Example\, Inc. Root,C=NL")
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Example, Inc. Root"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Example Root CA", "malformed"),
        ("CN=a,,O=b", "malformed"),
        ("=x", "malformed"),
        ("FOO=bar", "unknown attribute 'FOO'"),
        ("C=Netherlands", "C must be a two-letter country code, not 'Netherlands'"),
        ("C=N1", "two-letter country code"),
        ("CN=", "CN is empty"),
        ("CN=a,O=", "O is empty"),
        ("CN=a\x00b", "control character"),
        (r"CN=a\00b", "control character"),
        ("CN=a\nb", "control character"),
        ("CN=a+O=b", "multi-valued RDN"),
        ("CN=#0403616263", "hex-encoded"),
        ("CN=a,CN=b", "more than one CN"),
        ("1.2.3.4=x", "unsupported attribute 1.2.3.4"),
        ("CN=" + "x" * 65, "64"),
    ],
)
def test_parse_dn_refusals(text, why):
    with pytest.raises(UsageError, match=why):
        parse_dn(text)


def test_parse_dn_dotted_oid_of_known_attribute():
    assert parse_dn("2.5.4.3=Root") == x509.Name([cn("Root")])


def test_fast_paths_refuse_exactly_what_the_character_checks_refuse() -> None:
    """The regex shortcuts in policy.py must agree with the per-character rules they skip."""
    import unicodedata

    from hsm_ca.errors import CsrRejected
    from hsm_ca.policy import _has_control, _is_control, normalize_dns_name

    for code in range(0x300):
        ch = chr(code)
        assert _has_control(f"ab{ch}cd") == _is_control(ch), hex(code)
    for code in range(0x80):
        ch = chr(code)
        refused_by_rule = (
            ch in "\x00," or ch.isspace() or unicodedata.category(ch).startswith("Z")
            or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")
        )
        try:
            normalize_dns_name(f"a{ch}b.example.com")
            refused = False
        except CsrRejected as e:
            refused = "NUL" in str(e) or "comma" in str(e) or "whitespace" in str(e) \
                or "control character" in str(e)
        assert refused == refused_by_rule, hex(code)


# --------------------------------------------------------------------------- finding 13:
# subject size, ISO 3166 countries, URI schemes per profile, mixed-script IDNs

OU = NameOID.ORGANIZATIONAL_UNIT_NAME


def test_subject_with_a_thousand_ous_refused():
    csr = make_csr(subject=[cn("client")] + [attr(OU, f"unit {i}") for i in range(1000)])
    reject(csr, "tls-client", "1001 attributes; at most 16")


def test_subject_attribute_counts_bounded_per_type_and_in_all():
    reject(make_csr(subject=[attr(OU, f"u{i}") for i in range(5)]), "tls-client", "5 OU")
    reject(make_csr(subject=[attr(NameOID.COUNTRY_NAME, "NL"), attr(NameOID.COUNTRY_NAME, "DE")]),
           "tls-client", "2 C attributes; at most 1")
    reject(make_csr(subject=[attr(NameOID.SERIAL_NUMBER, "1"), attr(NameOID.SERIAL_NUMBER, "2")]),
           "tls-client", "2 serialNumber")
    many = [attr(OU, f"u{i}") for i in range(4)] + [attr(NameOID.ORGANIZATION_NAME, f"o{i}")
                                                   for i in range(4)]
    many += [attr(NameOID.EMAIL_ADDRESS, f"a{i}@example.com") for i in range(4)]
    many += [attr(x509.ObjectIdentifier("2.5.4.12"), f"t{i}") for i in range(4)]  # title
    reject(make_csr(subject=[cn("c"), *many]), "intermediate-ca", "17 attributes")
    # a real subject passes: four OUs, one of each of the rest
    ok = [cn("client"), attr(NameOID.ORGANIZATION_NAME, "Example"),
          *[attr(OU, f"u{i}") for i in range(4)], attr(NameOID.COUNTRY_NAME, "NL")]
    assert len(check_request(make_csr(subject=ok), profile("tls-client")).subject) == 7


def test_subject_count_also_bounds_operator_dns():
    with pytest.raises(UsageError, match="at most 16"):
        parse_dn("CN=x," + ",".join(f"OU=u{i}" for i in range(40)))
    with pytest.raises(UsageError, match="5 OU attributes"):
        parse_dn("CN=x," + ",".join(f"OU=u{i}" for i in range(5)))


def test_unlisted_attribute_types_have_a_length_bound():
    title = x509.ObjectIdentifier("2.5.4.12")
    reject(make_csr(subject=[cn("c"), attr(title, "t" * 5000)]), "intermediate-ca",
           "5000 characters, over the limit of 128")
    reject(make_csr(subject=[cn("c"), attr(NameOID.DOMAIN_COMPONENT, "d" * 64)]),
           "intermediate-ca", "over the limit of 63")


@pytest.mark.parametrize("code", ["XX", "ZZ", "QQ", "AA", "UK", "EU"])
def test_country_codes_outside_iso_3166_refused(code):
    reject(make_csr(subject=[cn("c"), attr(NameOID.COUNTRY_NAME, code)]), "tls-client",
           "ISO 3166-1")
    with pytest.raises(UsageError, match="ISO 3166-1"):
        parse_dn(f"CN=x,C={code}")


@pytest.mark.parametrize("code", ["NL", "DE", "GB", "US", "JP", "BR"])
def test_iso_3166_country_codes_accepted(code):
    checked = check_request(make_csr(subject=[cn("c"), attr(NameOID.COUNTRY_NAME, code)]),
                            profile("tls-client"))
    assert checked.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == code
    assert parse_dn(f"CN=x,C={code.lower()}").rfc4514_string() == f"CN=x,C={code}"


@pytest.mark.parametrize(
    "uri",
    ["javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,<b>x</b>", "file:///etc/passwd",
     "http://www.example.com/", "ldap://ldap.example.com/cn=x", "mailto:a@example.com"],
)
def test_uri_schemes_outside_the_profile_refused(uri):
    msg = reject(make_csr(subject=[], sans=[x509.UniformResourceIdentifier(uri)]), "tls-client",
                 "does not allow")
    assert "allowed: https, spiffe, urn" in msg


def test_shipped_profiles_default_to_https_spiffe_urn():
    for name in ("tls-client", "tls-server", "code-signing"):
        assert shipped(name).uri_schemes == frozenset({"https", "spiffe", "urn"})


def _client_profile_text(extra: str) -> str:
    """The shipped tls-client profile with ``extra`` lines in [request] (replacing theirs)."""
    lines = pathlib.Path(shipped("tls-client").source).read_text().splitlines(keepends=True)
    keys = {line.split("=")[0].strip() for line in extra.splitlines()}
    text = "".join(x for x in lines if x.split("=")[0].strip() not in keys)
    return text.replace("[request]\n", f"[request]\n{extra}\n")


def test_a_profile_can_allow_other_uri_schemes(tmp_path):
    text = _client_profile_text('uri_schemes = ["http", "https"]')
    (tmp_path / "tls-client.toml").write_text(text)
    p = ProfileStore(tmp_path).get("tls-client")
    assert p.uri_schemes == frozenset({"http", "https"})
    sans = [x509.UniformResourceIdentifier("http://www.example.com/")]
    assert check_request(make_csr(subject=[], sans=sans), p).sans == tuple(sans)
    reject_with(make_csr(subject=[], sans=[x509.UniformResourceIdentifier("urn:x:y")]), p,
                "scheme 'urn'")


@pytest.mark.parametrize(
    ("schemes", "why"),
    [('["JavaScript"]', "bad scheme"), ('["https:"]', "bad scheme"), ('["javascript"]', "must not"),
     ('["data"]', "must not"), ('"https"', "must be a list")],
)
def test_bad_uri_schemes_refused_when_the_profile_loads(tmp_path, schemes, why):
    from hsm_ca.errors import ProfileInvalid

    (tmp_path / "tls-client.toml").write_text(_client_profile_text(f"uri_schemes = {schemes}"))
    with pytest.raises(ProfileInvalid, match=why):
        ProfileStore(tmp_path).get("tls-client")


# раураl: Cyrillic р а у а р а with a Latin l — "paypal" to the eye
MIXED = "\u0440\u0430\u0443\u0440\u0430l.com"


def a_label(name: str) -> str:
    """cryptography takes DNS names as A-labels only (the idna package, UTS #46)."""
    import idna

    return idna.encode(name, uts46=True).decode("ascii")


MIXED_A = a_label(MIXED)


@pytest.mark.parametrize(
    "name",
    [MIXED, "www.\u0440\u0430\u0443\u0440\u0430l.com",
     "g\u03bfogle.com",  # Greek omicron in Latin
     "\u0430pple.example"],
)
def test_mixed_script_idn_labels_refused(name):
    msg = reject(make_csr(subject=[], sans=[x509.DNSName(a_label(name))]), "tls-server",
                 "mixing scripts")
    assert "allow_mixed_script" in msg
    # the CN path (copied into the SANs) meets the same check
    reject(make_csr(subject=[cn(name)]), "tls-server", "mixing scripts")


def test_mixed_script_refused_in_email_and_uri_hosts():
    reject(make_csr(subject=[], sans=[x509.RFC822Name("a@" + MIXED_A)]),
           "tls-client", "mixing scripts")
    reject(make_csr(subject=[], sans=[x509.UniformResourceIdentifier(
        "https://" + MIXED_A + "/")]), "tls-client", "mixing scripts")


@pytest.mark.parametrize(
    "name",
    ["\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",  # пример.рф: all Cyrillic
     "b\u00fccher.example",  # bücher: Latin with a diacritic
     "\u65e5\u672c\u8a9e\u304b\u306a.jp",  # Han + Hiragana: highly restrictive allows it
     "\ud55c\uad6dabc.kr",  # Hangul + Latin
     "xn--80ak6aa92e.com"],  # аррӏе: whole-script Cyrillic; single script, so allowed
)
def test_single_script_idn_labels_accepted(name):
    checked = check_request(make_csr(subject=[], sans=[x509.DNSName(a_label(name))]),
                            profile("tls-server"))
    assert len(checked.sans) == 1


def test_a_profile_can_allow_mixed_script():
    p = dataclasses.replace(profile("tls-server"), allow_mixed_script=True)
    checked = check_request(make_csr(subject=[], sans=[x509.DNSName(MIXED_A)]), p)
    assert checked.sans == (x509.DNSName(MIXED_A),)


def test_is_single_script():
    assert policy.is_single_script("example") and policy.is_single_script("123-abc")
    assert not policy.is_single_script("\u0440\u0430\u0443\u0440\u0430l")
    assert not policy.is_single_script("a\u0391")  # Latin + Greek
    assert policy.is_single_script("\u0430\u0301\u0431")  # a combining mark is INHERITED


# ---- the same through the real CLI sign path: one Error line, exit 1, a refused record

HOSTILE_CSRS = {
    "thousand-ous": ("tls-client", dict(subject=[cn("client")] + [attr(OU, f"u{i}")
                                                                  for i in range(1000)])),
    "country-xx": ("tls-client", dict(subject=[cn("client"), attr(NameOID.COUNTRY_NAME, "XX")])),
    "javascript-uri": ("tls-client", dict(
        subject=[cn("client")], sans=[x509.UniformResourceIdentifier("javascript:alert(1)")])),
    "mixed-script": ("tls-server", dict(subject=[], sans=[x509.DNSName(MIXED_A)])),
    "mixed-script-cn": ("tls-server", dict(subject=[cn(MIXED)])),
}


@pytest.fixture(scope="module")
def hostile_csr_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    files = {}
    for name, (prof, kw) in HOSTILE_CSRS.items():
        path = d / f"{name}.csr"
        path.write_bytes(pem(make_csr(**kw)))
        files[name] = (prof, path)
    return files


def test_hostile_subjects_and_names_refused_through_the_cli(soft_pki, hostile_csr_files, tmp_path):
    import json

    for name, (prof, path) in hostile_csr_files.items():
        out = tmp_path / f"{name}.pem"
        r = soft_pki("sign", str(path), "--ca", "issuing", "--profile", prof, "-o", str(out))
        assert r.code == 1, (name, r.code, r.out, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), (name, r.err)
        assert not out.exists(), name
    listed = json.loads(soft_pki.ok("--json", "list").out)
    assert [c for c in listed if not c["profile"].endswith("-ca")] == []
    records = json.loads(soft_pki.ok("--json", "audit", "list").out)
    refused = [r for r in records if r["action"] == "issue" and r["outcome"] == "refused"]
    assert len(refused) == len(hostile_csr_files)
    # and a good request on the same profiles still issues
    good = tmp_path / "good.csr"
    good.write_bytes(pem(make_csr(
        subject=[cn("client"), attr(NameOID.COUNTRY_NAME, "NL")],
        sans=[x509.UniformResourceIdentifier("spiffe://example.org/x")])))
    soft_pki.ok("sign", str(good), "--ca", "issuing", "--profile", "tls-client")
