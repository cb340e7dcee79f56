"""The disk spool: bounded, oldest first, whole entries only, survives a restart."""

from pathlib import Path

from agent.sinks.spool import Spool


def test_oldest_first_and_survives_reopen(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), 10_000)
    for i in range(3):
        assert s.push("otel_traces", 10 + i, f"payload-{i}".encode()) == []
    again = Spool(str(tmp_path), 10_000)
    assert len(again) == 3 and again.bytes == 3 * len(b"payload-0")
    entry, data = again.oldest()  # type: ignore[misc]
    assert data == b"payload-0" and entry.count == 10 and entry.tag == "otel_traces"
    again.remove(entry)
    assert again.oldest()[1] == b"payload-1"  # type: ignore[index]
    again.push("otel_logs", 1, b"x")
    assert [e.seq for e in again._entries] == [1, 2, 3]  # sequence continues after a restart


def test_bound_drops_the_oldest_and_reports_it(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), 250)
    dropped = []
    for i in range(10):
        dropped += s.push("metrics", i, bytes(100))
    assert s.bytes <= 250 and len(s) == 2
    assert [d.count for d in dropped] == [0, 1, 2, 3, 4, 5, 6, 7]
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk == s.bytes


def test_an_entry_larger_than_the_bound_is_dropped_alone(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), 100)
    s.push("metrics", 1, bytes(50))
    dropped = s.push("metrics", 7, bytes(101))
    assert [d.count for d in dropped] == [7] and len(s) == 1


def test_interrupted_writes_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / "000000000004.otel_traces.5.spool.tmp").write_bytes(b"half")
    (tmp_path / "unrelated.txt").write_text("keep")
    s = Spool(str(tmp_path), 1000)
    assert len(s) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.txt"]
