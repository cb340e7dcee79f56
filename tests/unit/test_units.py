import pytest

from agent import units


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("7d", 604800), ("36h", 129600), ("1h30m", 5400), ("250ms", 0.25),
    ("0s", 0), ("15", 15), (10, 10), ("2w", 1209600),
])
def test_durations(text: str, seconds: float) -> None:
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7 days", "1x", "s", "-5s", "h1", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        units.parse_duration(text)  # type: ignore[arg-type]


def test_format_duration_round_trips() -> None:
    for s in (604800, 86400 * 3, 3600 * 36, 5400, 30, 0.25):
        assert units.parse_duration(units.format_duration(s)) == s


@pytest.mark.parametrize(("text", "size"), [
    ("500MB", 500_000_000), ("1GiB", 1 << 30), ("200Mi", 200 << 20), ("1Gi", 1 << 30),
    ("4096", 4096), (123, 123), ("10kb", 10_000),
])
def test_sizes(text: str, size: int) -> None:
    assert units.parse_size(text) == size


def test_host_port() -> None:
    assert units.parse_host_port("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert units.parse_host_port(":9") == ("0.0.0.0", 9)
    assert units.parse_host_port("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        units.parse_host_port("host:99999")
