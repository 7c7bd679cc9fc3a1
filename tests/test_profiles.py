"""Profiles are data, validated when loaded, with errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsm_ca.errors import ProfileInvalid, ProfileNotFound
from hsm_ca.profiles import SHIPPED_PROFILES, ProfileStore, parse_profile, shipped_profiles_dir


def test_every_shipped_profile_loads_and_says_what_it_allows() -> None:
    store = ProfileStore(None)
    assert set(SHIPPED_PROFILES) <= set(store.names())
    for name in SHIPPED_PROFILES:
        p = store.get(name)
        assert p.key_usage and p.key_types and 1 <= p.default_days <= p.max_days
        assert p.is_ca == name.endswith("-ca")
    tls = store.get("tls-server")
    assert tls.default_days == 90 and tls.cabf_server_auth and tls.policies == ("2.23.140.1.2.1",)
    assert tls.san_kinds == {"dns", "ip"} and tls.san_required
    assert store.get("timestamping").eku_critical
    assert store.get("ocsp-signing").ocsp_no_check


BASE = (shipped_profiles_dir() / "tls-client.toml").read_text()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda t: t + "\nunknown = 1\n", "unknown"),
        (lambda t: t.replace("default_days = 365", 'default_days = "365"'), "certificate.default_days"),
        (lambda t: t.replace("default_days = 365", "default_days = 9999"), "certificate.default_days"),
        (lambda t: t.replace('key_usage = ["digital_signature"]', 'key_usage = ["sign_everything"]'),
         "certificate.key_usage"),
        (lambda t: t.replace('extended_key_usage = ["clientAuth"]', 'extended_key_usage = ["any"]'),
         "certificate.extended_key_usage"),
        (lambda t: t.replace('key_usage = ["digital_signature"]', 'key_usage = ["key_cert_sign"]'),
         "key_cert_sign"),
        (lambda t: t.replace('"ec-p256", ', '"ec-p192", '), "request.key_types"),
        (lambda t: t.replace('san_kinds = ["dns", "email", "uri"]', 'san_kinds = ["x400"]'),
         "request.san_kinds"),
        (lambda t: t.replace("[request]", "[request]\nfoo = 1"), "request.foo"),
        (lambda t: t.replace("[certificate]", "[certificat]"), "certificat"),
        (lambda t: t + "\n[[[", "TOML"),
    ],
)
def test_invalid_profiles_name_file_and_field(edit: object, field: str) -> None:
    with pytest.raises(ProfileInvalid) as e:
        parse_profile("tls-client", edit(BASE), "/x/tls-client.toml")  # type: ignore[operator]
    assert "/x/tls-client.toml" in str(e.value) and field in str(e.value)


def test_home_overrides_and_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "tls-client.toml").write_text(BASE.replace("default_days = 365", "default_days = 7"))
    (tmp_path / "custom.toml").write_text(BASE)
    store = ProfileStore(tmp_path)
    assert store.get("tls-client").default_days == 7
    assert store.get("tls-server").default_days == 90
    assert "custom" in store.names()
    for bad in ("nope", "../tls-client", ".hidden", ""):
        with pytest.raises(ProfileNotFound):
            store.get(bad)
