"""Sizes and durations from the command line."""

from __future__ import annotations

import pytest

from imgci.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("512", 512), ("1k", 1024), ("500m", 500 << 20), ("2g", 2 << 30), ("2GiB", 2 << 30), ("1.5M", 1572864)],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("90", 90), ("90m", 5400), ("24h", 86400), ("7d", 604800), ("1h30m", 5400)]
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "5x", "-1", "1h 30m"])
def test_bad_input_says_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_size(text)
    with pytest.raises(ValueError, match="expected"):
        parse_duration(text)
