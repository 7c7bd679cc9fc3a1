"""CLI.md "Names": one ASCII rule for CA names, signer labels and bootstrap files.

Judged through the real CLI: exit codes, the one ``Error:`` line (bounded, naming
the rule), and what the home holds afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEST_SCRYPT_N, Cli, init_args

from hsm_ca.errors import UsageError

# (id, name): every one breaks the rule
BAD_NAMES = [
    ("latin-e-acute", "caf\u00e9"),
    ("math-fraktur-r", "\U0001d52foot"),  # 𝔯oot: isalnum() says yes
    ("cyrillic-o", "r\u043e\u043et"),  # rоot with Cyrillic o's
    ("fullwidth", "\uff52oot"),
    ("kelvin-sign", "\u212aey"),  # K (KELVIN SIGN) folds to k under re.IGNORECASE
    ("superscript-two", "root\u00b2"),
    ("arabic-digit", "root\u0663"),
    ("leading-dot", ".root"),
    ("leading-dash", "-root"),
    ("leading-underscore", "_root"),
    ("space", "my root"),
    ("slash", "a/b"),
    ("newline", "root\n"),
    ("length-65", "a" * 65),
    ("length-5000", "b" * 5000),
]


def _assert_usage_error(r: object, rule: str = "ASCII letters, digits") -> None:
    assert r.code == 2, (r.code, r.out, r.err)  # type: ignore[attr-defined]
    err = r.err  # type: ignore[attr-defined]
    assert err.startswith("Error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert rule in err, err
    # never more than 64 characters of the input (plus the fixed rule text)
    assert len(err) < 300, len(err)


@pytest.fixture
def home(cli: Cli) -> Cli:
    cli.ok(*init_args("soft"))
    cli.ok("ca", "create-root", "root", "--subject", "CN=Test Root CA,O=Test,C=NL")
    return cli


@pytest.mark.parametrize("name", [n for _, n in BAD_NAMES], ids=[i for i, _ in BAD_NAMES])
def test_bad_ca_names_are_usage_errors_through_the_cli(home: Cli, name: str) -> None:
    r = home("ca", "create-root", "--subject", "CN=X", "--", name)
    _assert_usage_error(r)
    r = home("ca", "create-intermediate", "--parent", "root", "--subject", "CN=X", "--", name)
    _assert_usage_error(r)
    names = [c["name"] for c in json.loads(home.ok("ca", "list", "--json").out)]
    assert names == ["root"]


@pytest.mark.parametrize("name", [n for _, n in BAD_NAMES], ids=[i for i, _ in BAD_NAMES])
def test_bad_signer_labels_are_usage_errors_through_the_cli(home: Cli, name: str) -> None:
    r = home("codesign", "new-signer", "--ca", "root", "--subject", "CN=S", "--", name)
    _assert_usage_error(r)


@pytest.mark.parametrize("name", ["foo-delta", "foo-DELTA", "Foo-Delta", "-delta"])
def test_a_ca_name_never_ends_in_delta(home: Cli, name: str) -> None:
    r = home("ca", "create-root", "--subject", "CN=X", "--", name)
    _assert_usage_error(r, "-delta")


def test_delta_suffix_is_only_refused_for_ca_names(home: Cli) -> None:
    # a signer's name is not a CRL URL: the suffix means nothing there
    home.ok("codesign", "new-signer", "release-delta", "--ca", "root", "--subject", "CN=S")


def test_ca_names_are_unique_regardless_of_case(home: Cli) -> None:
    for name in ("ROOT", "Root", "rOOT"):
        r = home("ca", "create-root", name, "--subject", "CN=Other Root")
        assert r.code == 1, (r.code, r.err)
        assert r.err.startswith("Error:") and "'root' already exists" in r.err, r.err
        assert "regardless of case" in r.err
    r = home("ca", "create-intermediate", "ROOT", "--parent", "root", "--subject", "CN=Sub")
    assert r.code == 1 and "'root' already exists" in r.err, r.err
    assert home.ok("keys", "list", "--json").out.count('"ca-') == 1  # no second key made
    refused = home.ok("audit", "export").out
    assert "create CA 'ROOT'" in refused  # the refused signing is on the trail


def test_signer_labels_are_unique_regardless_of_case(home: Cli) -> None:
    home.ok("codesign", "new-signer", "release", "--ca", "root", "--subject", "CN=S")
    r = home("codesign", "new-signer", "Release", "--ca", "root", "--subject", "CN=S2")
    assert r.code == 1 and "'release' already exists" in r.err, r.err


def test_names_of_64_characters_work_end_to_end(home: Cli, tmp_path: Path) -> None:
    # the derived HSM key labels (ca-NAME, codesign-NAME) are longer than 64: still fine
    ca = "c" * 64
    home.ok("ca", "create-root", ca, "--subject", "CN=Long Root")
    home.ok("ca", "create-intermediate", "d" * 64, "--parent", ca, "--subject", "CN=Long Sub")
    home.ok("codesign", "new-signer", "s" * 64, "--ca", ca, "--subject", "CN=Long Signer")
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x")
    home.ok("codesign", "sign", str(f), "--signer", "s" * 64)


def test_unknown_names_are_not_echoed_in_full(home: Cli, tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x")
    for args in (("crl", "z" * 5000), ("codesign", "sign", str(f), "--signer", "z" * 5000)):
        r = home(*args)
        assert r.code in (1, 2) and r.err.startswith("Error:"), (args, r.err)
        assert "z" * 65 not in r.err, (args, len(r.err))


def test_with_base_url_issuing_under_a_valid_name_works(cli: Cli, tmp_path: Path) -> None:
    cli.ok(*init_args("soft", "--base-url", "http://ca.example.test"))
    r = cli("ca", "create-root", "\u00e9", "--subject", "CN=Accented")
    _assert_usage_error(r)
    cli.ok("ca", "create-root", "r.o-o_t9", "--subject", "CN=Ok Root")
    cli.ok("ca", "create-intermediate", "sub", "--parent", "r.o-o_t9", "--subject", "CN=Ok")


# ------------------------------------------------------------------ bootstrap files

def _bootstrap(tmp_path: Path, body: str) -> Path:
    d = tmp_path / "pki"
    d.mkdir(exist_ok=True)
    toml = d / "pki.toml"
    toml.write_text(body, encoding="utf-8")
    return toml


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string for these


@pytest.mark.parametrize("name", [n for _, n in BAD_NAMES], ids=[i for i, _ in BAD_NAMES])
def test_bootstrap_refuses_bad_ca_names_and_signer_labels(
    cli: Cli, tmp_path: Path, name: str
) -> None:
    for body in (
        f'[[ca]]\nname = {_toml_str(name)}\nsubject = "CN=R"\n',
        f'[[ca]]\nname = "root"\nsubject = "CN=R"\n\n'
        f'[[signer]]\nlabel = {_toml_str(name)}\nca = "root"\nsubject = "CN=S"\n',
    ):
        toml = _bootstrap(tmp_path, body)
        r = cli("bootstrap", str(toml), "--plan")
        assert r.code in (1, 2), (r.code, r.err)
        assert r.err.startswith("Error:") and "Traceback" not in r.err, r.err
        assert "ASCII letters, digits" in r.err, r.err
        assert len(r.err) < 400, len(r.err)
        assert not cli.home.exists()


def test_bootstrap_refuses_case_duplicates_and_delta(cli: Cli, tmp_path: Path) -> None:
    cases = [
        ('[[ca]]\nname = "root"\nsubject = "CN=R"\n\n[[ca]]\nname = "ROOT"\nsubject = "CN=R2"\n',
         "regardless of case"),
        ('[[ca]]\nname = "root"\nsubject = "CN=R"\n\n'
         '[[signer]]\nlabel = "rel"\nca = "root"\nsubject = "CN=S"\n\n'
         '[[signer]]\nlabel = "REL"\nca = "root"\nsubject = "CN=S"\n', "regardless of case"),
        ('[[ca]]\nname = "crl-Delta"\nsubject = "CN=R"\n', "-delta"),
    ]
    for body, needle in cases:
        r = cli("bootstrap", str(_bootstrap(tmp_path, body)), "--plan")
        assert r.code in (1, 2) and r.err.startswith("Error:"), r.err
        assert needle in r.err, r.err


def test_bootstrap_refuses_a_case_variant_of_a_ca_in_the_home(cli: Cli, tmp_path: Path) -> None:
    cli.ok("bootstrap", str(_bootstrap(tmp_path, '[[ca]]\nname = "root"\nsubject = "CN=R"\n')),
           "--scrypt-n", str(TEST_SCRYPT_N))
    toml = _bootstrap(tmp_path, '[[ca]]\nname = "Root"\nsubject = "CN=R"\n')
    r = cli("bootstrap", str(toml), "--plan")
    assert r.code in (1, 2) and "already has CA 'root'" in r.err, r.err


# ------------------------------------------------------------------ the function itself

def test_check_name_rule() -> None:
    from hsm_ca.names import check_ca_name, check_name

    for ok in ("a", "A1", "0x", "root.ca-1_b", "x" * 64):
        assert check_name(ok) == ok
        assert check_ca_name(ok) == ok
    for _, bad in BAD_NAMES:
        with pytest.raises(UsageError) as e:
            check_name(bad, "signer label")
        assert "signer label" in str(e.value) and len(str(e.value)) < 250
    with pytest.raises(UsageError):
        check_ca_name("x-delta")
    assert check_name("x-delta") == "x-delta"


def test_bootstrap_unknown_ca_references_are_not_echoed_in_full(cli: Cli, tmp_path: Path) -> None:
    long = "q" * 5000
    for body in (
        f'[[ca]]\nname = "sub"\nparent = "{long}"\nsubject = "CN=S"\n',
        f'[[ca]]\nname = "root"\nsubject = "CN=R"\n\n'
        f'[[signer]]\nlabel = "rel"\nca = "{long}"\nsubject = "CN=S"\n',
    ):
        r = cli("bootstrap", str(_bootstrap(tmp_path, body)), "--plan")
        assert r.code in (1, 2) and r.err.startswith("Error:"), r.err
        assert "unknown" in r.err and "q" * 65 not in r.err, len(r.err)


def test_hsm_user_names_follow_the_rule_and_ignore_case(
    home: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSM_CA_NEW_PIN", "alice-pin-12345")
    for bad in ("\u0430lice", "al ice", "-alice", "x" * 65):
        r = home("hsm", "user", "add", "--", bad)
        _assert_usage_error(r)
    home.ok("hsm", "user", "add", "alice")
    r = home("hsm", "user", "add", "Alice")
    assert r.code == 1 and "'alice' already exists" in r.err, r.err
    users = [u["name"] for u in json.loads(home.ok("--json", "hsm", "user", "list").out)]
    assert "Alice" not in users and "alice" in users
