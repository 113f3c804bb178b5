"""maildir/lineends.py: the CRLF form of stored messages and its size."""

from __future__ import annotations

import io

import pytest

from maildir.lineends import LineEndCache, LineEnds, scan, to_crlf

CASES = [
    b"",
    b"a\r\nb\r\n",
    b"a\nb\n",
    b"a\r\nb\nc\rd\r\r\n\n",
    b"\n\n\r\n",
]


@pytest.mark.parametrize("data", CASES)
def test_crlf_form_and_its_size(data: bytes) -> None:
    served = to_crlf(data)
    assert b"\n" not in served.replace(b"\r\n", b"")
    assert served.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
    ends = LineEnds.of(data)
    assert ends.size == len(served)
    assert ends.clean == (served == data)
    assert scan(io.BytesIO(data)) == ends


def test_scan_counts_a_crlf_split_between_chunks() -> None:
    data = b"x" * ((1 << 20) - 1) + b"\r\n" + b"y\n"
    assert scan(io.BytesIO(data)) == LineEnds(len(data) + 1, False)
    clean = b"x" * ((1 << 20) - 1) + b"\r\nz\r\n"
    assert scan(io.BytesIO(clean)) == LineEnds(len(clean), True)


def test_cache_is_bounded_and_keyed_by_id_and_size() -> None:
    cache = LineEndCache(size=2)
    cache.put("a", 1, LineEnds(2, False))
    cache.put("b", 1, LineEnds(1, True))
    assert cache.get("a", 2) is None
    cache.put("c", 1, LineEnds(1, True))
    assert cache.get("a", 1) is None and cache.get("c", 1) == LineEnds(1, True)
