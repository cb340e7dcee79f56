"""Log parsing pieces: PII scrubber, levels, patterns, runtime formats, multi-line joining, and
the file tailer (on real files in a temporary directory)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.logs.formats import Line, MultilineJoiner, PartialJoiner, parse_time_ns
from agent.logs.patterns import (
    PatternSet,
    detect_level,
    level_of_priority,
    level_of_word,
    pattern_hash,
    pattern_words,
)
from agent.logs.pii import Scrubber, luhn_ok
from agent.logs.tailer import Tailer


def test_scrubber_masks_email_card_token_jwt_and_secrets() -> None:
    s = Scrubber()
    line = ("user bob@example.com paid with 4111 1111 1111 1111 using Authorization: Bearer abcDEF123456789xyz "
            "jwt=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sflKxwRJSMeKKF2QT4fwpM password=hunter2 id=4111111111111112")
    out = Scrubber(headers=False)(line)
    assert out == ("user <email> paid with <card> using Authorization: Bearer <token> "
                   "jwt=<jwt> password=<secret> id=4111111111111112")  # the last fails Luhn: kept
    # With header masking (on by default) an Authorization value runs to the end of the line.
    assert s(line) == "user <email> paid with <card> using Authorization: Bearer <token>"
    assert Scrubber(ipv4=True)("from 10.1.2.3") == "from <ip>"
    assert Scrubber()("from 10.1.2.3") == "from 10.1.2.3"
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_masks_keep_the_pattern_stable() -> None:
    ps, s = PatternSet(), Scrubber()
    a = ps.match(s("login failed for alice@example.com from 10.0.0.1"))
    b = ps.match(s("login failed for bob@corp.io from 10.0.0.7"))
    assert a is b


def test_levels() -> None:
    assert detect_level("2024-01-01 ERROR db down") == "error"
    assert detect_level("[WARN] slow") == "warning"
    assert detect_level("FATAL: out of memory") == "critical"
    assert detect_level("level=info msg=ok") == "info"
    assert detect_level("DEBUG x") == "debug"
    assert detect_level("all good here") == "unknown"
    assert level_of_word("WARNING") == "warning" and level_of_word("bogus") == "unknown"
    assert [level_of_priority(p) for p in range(8)] == ["critical"] * 3 + ["error", "warning", "info", "info", "debug"]


def test_patterns_group_variants_and_cap_overflows_to_unclassified() -> None:
    ps = PatternSet(cap=2)
    p1 = ps.match("ERROR order 1234 failed: timeout after 30s", "error")
    assert ps.match("ERROR order 99 failed: timeout after 5s", "error") is p1
    assert ps.match("ERROR order 99 aborted: timeout after 5s", "error") is p1  # one word differs
    p2 = ps.match("ERROR payment \"abc\" declined by 3f2a9c1e-0b7d-4c2e-9f1a-2b3c4d5e6f70", "error")
    assert p2 is not p1 and ps.match("ERROR payment \"x\" declined by 00000000-0b7d-4c2e-9f1a-2b3c4d5e6f70",
                                     "error") is p2
    p3 = ps.match("something entirely different happened here", "error")
    assert (p3.hash, p3.sample) == ("0" * 32, "unclassified pattern (pattern limit reached)")  # logparser's
    assert ps.match("something entirely different happened here", "warning").hash != "0" * 32  # per level
    assert len(p1.hash) == 32


def test_only_critical_error_and_warning_messages_get_a_pattern() -> None:
    """logparser's Parser.inc: unknown, debug and info messages are counted under one series
    per level with an empty hash and sample, and take no room among the level's patterns."""
    ps = PatternSet(cap=1)
    for level in ("unknown", "debug", "info"):
        for msg in ("job 1 done in 5ms", "something else entirely", "job 2 done in 7ms"):
            p = ps.match(msg, level)
            assert (p.hash, p.sample, p.tokens) == ("", "", [])
    assert ps.count == 0 and all(not v for v in ps.by_level.values())
    for level in ("critical", "error", "warning"):
        p = ps.match("job 1 failed after 5ms", level)
        assert p.hash == pattern_hash(pattern_words("job 1 failed after 5ms")) and p.sample == "job 1 failed after 5ms"
        assert ps.match("disk full on node 7", level).hash == "0" * 32  # cap 1 per level: these levels count
    assert ps.count == 3


def test_pattern_hash_is_the_node_agents() -> None:
    """The node agent's pattern_hash is md5 of its log parser's pattern words joined by spaces
    (coroot/logparser pattern.go, v1.2.2). The expected values were computed by running that
    package's NewPattern(...).Hash() on the same inputs; the first is one of its own test cases."""
    cases = {
        "2019-07-24 12:06:21,688 package.name [DEBUG] got 10 things in 3.1s":
            ("package.name got things in", "f2ce8c24b54dec46d2d3612dc1cbb83d"),
        "WARN client 192.168.1.8:57600 closed connection after 1.000s":
            ("WARN client closed connection after", "3801a538de2dab408427e6f721ddf870"),
        "ERROR order 17 failed: timeout after 17s":
            ("ERROR order failed timeout after", "cf6e949ab39bbad1efe39c91107085ad"),
        'ERROR payment "abc" declined by 3f2a9c1e-0b7d-4c2e-9f1a-2b3c4d5e6f70 (card 0xdeadbeef)':
            ("ERROR payment declined by", "11e9337c8b30c1c85097215f646220ff"),
        "": ("", "d41d8cd98f00b204e9800998ecf8427e"),
    }
    for message, (words, digest) in cases.items():
        assert " ".join(pattern_words(message)) == words
        assert pattern_hash(pattern_words(message)) == digest
        assert PatternSet().match(message, "error").hash == digest
    # Quotes inside brackets, escaped quotes, hex-looking words (4+ hex letters are dropped).
    assert pattern_words("GET [a 'b] c' \\'x' added face decade abc=: k8s_pod x") == \
        ["GET", "abc", "ks_pod"]  # the reference gives "GET abc ks_pod"


def test_cri_partial_lines_are_joined() -> None:
    j = PartialJoiner()
    assert j.cri("2024-05-01T10:00:00.123456789Z stdout P hello ") is None
    line = j.cri("2024-05-01T10:00:00.223456789Z stdout F world")
    assert line == Line("hello world", parse_time_ns("2024-05-01T10:00:00.223456789Z"), "stdout")
    assert line.ts_ns == 1714557600223456789


def test_docker_json_partial_pieces_are_joined() -> None:
    j = PartialJoiner()
    assert j.docker('{"log":"part one ","stream":"stderr","time":"2024-05-01T10:00:00.5Z"}') is None
    line = j.docker('{"log":"part two\\n","stream":"stderr","time":"2024-05-01T10:00:00.6Z"}')
    assert line is not None and line.text == "part one part two" and line.stream == "stderr"
    assert j.docker("not json") == Line("not json")


def test_a_java_stack_trace_is_one_record() -> None:
    out: list[Line] = []
    j = MultilineJoiner(out.append)
    text = ["ERROR request failed", "java.lang.IllegalStateException: boom",
            "\tat com.example.Foo.bar(Foo.java:10)", "\tat com.example.Main.main(Main.java:3)",
            "Caused by: java.io.IOException: eof", "\t... 2 more", "INFO next"]
    for i, t in enumerate(text):
        j.feed(Line(t), now=float(i) * 0.01)
    j.tick(10.0)
    assert len(out) == 3
    assert out[0].text == "ERROR request failed"
    assert out[1].text.startswith("java.lang.IllegalStateException: boom\n\tat com.example.Foo.bar")
    assert out[1].text.endswith("\t... 2 more") and out[2].text == "INFO next"


def test_tailer_starts_at_the_end_and_follows_both_rotations(tmp_path: Path) -> None:
    p = tmp_path / "app.log"
    p.write_text("old 1\nold 2\n")
    t = Tailer(str(p))
    assert t.open(from_end=True)
    with open(p, "a") as f:
        f.write("new 1\nnew 2\npart")
    assert t.poll() == ["new 1", "new 2"]
    with open(p, "a") as f:
        f.write("ial\n")
    assert t.poll() == ["partial"]
    # rename + create
    os.rename(p, tmp_path / "app.log.1")
    with open(tmp_path / "app.log.1", "a") as f:
        f.write("late in old\n")
    p.write_text("first in new\n")
    assert t.poll() == ["late in old", "first in new"]
    # copytruncate: the file is emptied and written again, even past our old position
    with open(p, "r+") as f:
        f.truncate(0)
    with open(p, "a") as f:
        f.write("after truncate " + "x" * 100 + "\n")
    assert t.poll() == ["after truncate " + "x" * 100]
    assert t.rotations == 2


def test_tailer_cuts_long_lines_and_skips_binary(tmp_path: Path) -> None:
    p = tmp_path / "big.log"
    p.write_text("")
    t = Tailer(str(p), max_line=1000)
    t.open(from_end=True)
    with open(p, "ab") as f:
        f.write(b"a" * 1_000_000 + b"\nok\nbin\x00ary\nend\n")
    assert t.poll() == ["a" * 1000, "ok", "end"]
    assert t.truncated_lines == 1 and t.binary_lines == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_never_raise_on_garbage(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    PartialJoiner().cri(text)
    PartialJoiner().docker(text)
    PatternSet().match(text)
    detect_level(text)
    Scrubber(ipv4=True)(text)


def test_journald_entries_are_attributed_by_unit_with_priority_levels() -> None:
    from agent.logs.journald import JournalEntry, parse_entry

    # as `journalctl -o json` prints them (recorded shape)
    line = ('{"__REALTIME_TIMESTAMP":"1714557600123456","PRIORITY":"3","_SYSTEMD_UNIT":"nginx.service",'
            '"_SYSTEMD_SLICE":"system.slice","MESSAGE":"connect() failed (111: Connection refused)","_PID":"812"}')
    assert parse_entry(line) == JournalEntry("/system.slice/nginx.service", 1714557600123456000, "error",
                                             "connect() failed (111: Connection refused)")
    binary = '{"__REALTIME_TIMESTAMP":"1","PRIORITY":"6","_SYSTEMD_UNIT":"x.service","MESSAGE":[104,105,0,255]}'
    entry = parse_entry(binary)
    assert entry is not None and entry.message.startswith("hi") and entry.level == "info"
    assert parse_entry('{"MESSAGE":"kernel says hi","PRIORITY":"6"}') is None  # no unit: no container
    assert parse_entry('{"_SYSTEMD_UNIT":"session-1.scope","MESSAGE":"x"}') is None
    assert parse_entry("garbage") is None and parse_entry("[1,2]") is None


# ------------------------------------------------------------ records as the server reads them --


class _Sink:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def add(self, table: str, row: tuple[object, ...]) -> None:
        from agent.sinks import schema

        assert table == "otel_logs"
        self.rows.append(dict(zip(schema.TABLES_BY_NAME[table].insert_columns, row, strict=True)))


class _Registry:
    def container(self, cid: str) -> None:
        return None

    def containers(self) -> list[object]:
        return []


def _collector(metrics: bool = True, entries: bool = True) -> tuple[object, _Sink]:
    from agent.logs.collector import LogCollector

    sink = _Sink()
    c = LogCollector(_Registry(), sink, metrics=metrics, entries=entries, journald=False,  # type: ignore[arg-type]
                     pods_dir="/nonexistent", docker_dir="/nonexistent", host_id="m1")
    return c, sink


def _counts(c: object) -> dict[tuple[str, str], float]:
    from agent.metrics import Families

    f = Families({})
    c.collect(f)  # type: ignore[attr-defined]
    return {(s.labels["level"], s.labels["pattern_hash"]): s.value for fam in f
            for s in fam.samples if s.name == "container_log_messages_total"}


def test_each_record_carries_the_pattern_hash_of_its_counter() -> None:
    c, sink = _collector()
    cid = "/system.slice/app.service"
    lines = [f"ERROR order {i} failed: timeout after {i}s" for i in range(5)]
    lines += [f"WARN cache miss for key {i}" for i in range(3)] + ["INFO started in 12ms"]
    for i, line in enumerate(lines):
        c._process(cid, "journald", line, 1_000 + i, None)  # type: ignore[attr-defined]
    by_hash: dict[tuple[str, str], int] = {}
    for row in sink.rows:
        assert set(row["LogAttributes"]) == {"pattern.hash"}  # type: ignore[arg-type]
        key = (str(row["SeverityText"]), row["LogAttributes"]["pattern.hash"])  # type: ignore[index]
        by_hash[key] = by_hash.get(key, 0) + 1
    assert by_hash == _counts(c) and sorted(by_hash.values()) == [1, 3, 5]
    assert by_hash[("info", "")] == 1 and all(len(h) == 32 for lv, h in by_hash if lv != "info")
    res = sink.rows[0]["ResourceAttributes"]
    assert res == {"host.name": res["host.name"], "host.id": "m1", "container.id": cid,  # type: ignore[index]
                   "service.name": cid}


def test_records_keep_the_pattern_hash_when_log_metrics_are_off() -> None:
    c, sink = _collector(metrics=False)
    c._process("/system.slice/a.service", "journald", "ERROR disk 1 full", 1, None)  # type: ignore[attr-defined]
    c._process("/system.slice/a.service", "journald", "ERROR disk 2 full", 2, None)  # type: ignore[attr-defined]
    hashes = {r["LogAttributes"]["pattern.hash"] for r in sink.rows}  # type: ignore[index]
    assert len(hashes) == 1 and len(next(iter(hashes))) == 32 and _counts(c) == {}


def test_trace_context_fields_are_read_by_the_node_agents_names() -> None:
    from agent.logs.collector import trace_context

    tid, sid = "4BF92F3577B34DA6A3CE929D0E0E4736", "00F067AA0BA902B7"
    assert trace_context({"trace_id": tid, "span_id": sid}) == (tid.lower(), sid.lower())
    assert trace_context({"traceId": tid, "spanId": sid}) == (tid.lower(), sid.lower())
    assert trace_context({"@tr": tid, "@sp": sid}) == (tid.lower(), sid.lower())
    assert trace_context({"otel": {"trace.id": tid, "span-id": sid}}) == (tid.lower(), sid.lower())
    assert trace_context({"dd.trace_id": tid}) == (tid.lower(), "")
    assert trace_context({"parent_span_id": sid, "trace_id": "t1"}) == ("", "")  # not ids of this record
    assert trace_context({"trace_id": "0" * 32, "span_id": sid[:8]}) == ("", "")  # invalid ids
    assert trace_context({"trace": tid, "span": 5}) == ("", "")
