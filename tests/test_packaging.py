"""The wheel users install carries the shipped profiles and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_contains_profiles_and_entry_point(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("hsm_ca-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "hsm-ca = hsm_ca.entry:main" in z.read(entry).decode()
    for p in ("root-ca", "intermediate-ca", "tls-server", "tls-client", "code-signing",
              "ocsp-signing", "timestamping"):
        assert f"hsm_ca/profiles/{p}.toml" in names


def test_python_dash_m_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "hsm_ca", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "ca" in r.stdout and "sign" in r.stdout
