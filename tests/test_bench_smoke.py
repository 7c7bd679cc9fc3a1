"""scripts/bench.py runs every figure (tiny sizes) and prints one well-formed JSON array."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
FIGURES = (
    "issue_soft_ec_p256_single",
    "issue_soft_ec_p256_batch",
    "issue_soft_rsa2048_single",
    "issue_soft_rsa2048_batch",
    "issue_pkcs11_rsa2048",
    "issue_pkcs11_rsa2048_single",
    "cli_sign_1000",
    "cli_sign_one_vs_openssl",
    "cli_sign_one_vs_import",
    "crl_100k",
    "crl_1m",
    "crl_1m_peak_rss",
    "ocsp_http",
    "ocsp_http_idle_client",
    "help",
    "lint_cost",
)
OCSP = ("ocsp_http", "ocsp_http_idle_client")  # need ab; the bench installs it when it can


def test_bench_smoke_prints_every_figure_as_json() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(r.stdout)  # stdout is the JSON array and nothing else
    assert isinstance(data, list)
    names = [d["name"] for d in data]
    assert len(names) == len(set(names)), names
    expected = set(FIGURES)
    if shutil.which("ab") is None:  # could not install apache2-utils: skipped, and said so
        assert "OCSP figures skipped" in r.stderr
        expected -= set(OCSP)
    assert set(names) == expected, set(FIGURES) ^ set(names)
    for d in data:
        assert set(d) == {"name", "value", "unit", "baseline", "baseline_value", "ratio"}, d
        assert isinstance(d["baseline"], str) and d["baseline"], d
        assert isinstance(d["unit"], str) and d["unit"], d
        assert isinstance(d["value"], float) and d["value"] > 0, d
        value, base, ratio = d["value"], d["baseline_value"], d["ratio"]
        if d["name"] == "ocsp_http_idle_client" and base == 0:  # openssl stalled: no ratio
            assert ratio is None, d
            continue
        assert isinstance(base, float) and base > 0, d
        expect = value / base if d["unit"].endswith("/s") else base / value
        assert isinstance(ratio, float) and ratio > 0, d
        assert math.isclose(ratio, expect, rel_tol=1e-4), (d, expect)
    by_name = {d["name"]: d for d in data}
    assert by_name["crl_1m_peak_rss"]["unit"] == "MiB"
    assert by_name["crl_1m_peak_rss"]["baseline_value"] == 1024
    assert by_name["help"]["unit"] == "s"
    assert by_name["cli_sign_1000"]["unit"] == "certs/s"
