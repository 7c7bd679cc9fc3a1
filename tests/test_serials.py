"""Serial numbers: CSPRNG, >= 64 bits, positive, < 2^159, one spelling."""

from __future__ import annotations

import pytest

from hsm_ca.errors import UsageError
from hsm_ca.serials import format_serial, new_serial, parse_serial


def test_serials_are_large_positive_and_distinct() -> None:
    seen = {new_serial() for _ in range(5000)}
    assert len(seen) == 5000
    assert all(1 << 63 <= s < 1 << 159 for s in seen)
    # 127 random bits: the top bits must vary (a counter or a short RNG would not)
    assert len({s >> 100 for s in seen}) > 1000


def test_format_and_parse() -> None:
    assert format_serial(0x0ABC) == "abc"
    for text in ("abc", "ABC", "0abc", "00:0a:bc", "0x0ABC", " abc\n"):
        assert parse_serial(text) == 0xABC
    for bad in ("", "xyz", "0", "-1", "a" * 43, "12 34"):
        with pytest.raises(UsageError):
            parse_serial(bad)
