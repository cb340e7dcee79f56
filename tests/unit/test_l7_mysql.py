"""MySQL/MariaDB: commands and answers captured between MariaDB 10.11 (Debian's mariadb-server)
and clients on loopback (the wire client of tests/system/workloads/mysql_client.py and the
`mariadb` CLI), as the kernel hands them over — a client's whole packet and the first bytes of
the answer it read; the payload a server reads after the header and the answer it wrote — with
the node agent's statuses; prepared statements remembered per connection, bounded; masks;
garbage, random and truncated bytes; the kernel's detector (compiled natively from
bpf/include/l7/) against the parser; and through the tracer."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import contract, mysql
from agent.l7.contract import F_INBOUND, F_OUTBOUND
from agent.l7.mysql import Mysql, parse_answer, parse_command
from agent.l7.protocol import Masks, Peer, Settings
from tests.unit.l7_helpers import (
    CID,
    detector_lines,
    paired,
    tracer,
    value,
)

K = (1, 5, 9)
H = bytes.fromhex

# (the client's write, the first bytes of the answer): captured from the wire client
QUERY = H("190000000353454c4543542030202b20312c20277365637265742d3027")  # SELECT 0 + 1, 'secret-0'
RESULT = H("01000001021b000002036465660000000530202b2031000c3f00030000000381000000001e0000030364656600000008"
           "7365637265742d30000c210018000000fd010027000005000004fe000002000b0000050131087365637265742d3005"
           "000006fe00000200")
MISSING = H("2f0000000353454c454354202a2046524f4d2063615f6d697373696e675f3020574845524520736563726574203d2027"
            "783027")  # SELECT * FROM ca_missing_0 WHERE secret = 'x0'
ERR_1146 = H("2e000001ff7a042334325330325461626c65202763612e63615f6d697373696e675f302720646f65736e277420657869"
             "7374")
INSERT = H("2400000003494e5345525420494e544f2063615f6b762056414c5545532028302c2027762d302729")
OK_1_ROW = H("0700000100010002000000")
PREPARE = H("190000001653454c454354203f202b20312c2027616263272041532073")  # SELECT ? + 1, 'abc' AS s
PREPARE_OK = H("0c0000010004000000020001000000001700000203646566000000013f000c3f000000000006800000000005000003fe"
               "000002001b00000403646566000000053f202b2031000c3f001100000005800000000017000005036465660000000173"
               "000c210009000000fd010027000005000006fe00000200")  # statement 4
EXECUTE = H("1600000017040000000001000000000108000100000000000000")  # statement 4 with 1
EXECUTE_RESULT = H("01000001021b00000203646566000000053f202b2031000c3f001600000008800000000017000003036465660000"
                   "000173000c210009000000fd010027000005000004fe000002000e000005000002000000000000000361626305"
                   "000006fe00000200")
CLOSE = H("050000001904000000")  # COM_STMT_CLOSE of statement 4: no answer
PREPARE_BAD = H("240000001653454c454b5420302046524f4d206e6f77686572652057484552452078203d20277927")
ERR_1064 = H("c0000001ff2804233432303030596f75206861766520616e206572726f7220696e20796f75722053514c2073796e746178"
             "3b20636865636b20746865206d616e75616c207468617420636f72726573706f6e647320746f20796f7572204d617269"
             "614442207365727665722076657273696f6e20666f72207468652072696768742073796e74617820746f20757365206e"
             "656172202753454c454b5420302046524f4d206e6f77686572652057484552452078203d2027792727206174206c696e"
             "652031")
PREPARE_INSERT = H("2300000016494e5345525420494e544f2063615f6475702056414c55455320283f2c2027782729")
PREPARE_INSERT_OK = H("0c0000010006000000000001000000001700000203646566000000013f000c3f0000000000068000000000050000"
                      "03fe00000200")  # statement 6
EXECUTE_INSERT = H("1600000017060000000001000000000108006069000000000000")
ERR_1062 = H("32000001ff26042332333030304475706c696361746520656e747279202732363937362720666f72206b657920275052"
             "494d41525927")
QUIT = H("0100000001")
GREETING = H("640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100050000002c5754214578"
             "4e5d00fef7080200ff81150000000000001d00000066685a66743751726c455351006d7973716c5f6e61746976655f7061"
             "7373776f726400")
LOGIN = H("510000010da20a000000000121000000000000000000000000000000000000000000000063610014602d10287262729521"
          "a9bb710a3dead69a948f746361006d7973716c5f6e61746976655f70617373776f726400")
LOGIN_OK = H("0700000200000002000000")
# the `mariadb` CLI (libmariadb 3.3): result sets whose column count packet carries MariaDB's
# "metadata follows" byte; PREPARE/EXECUTE in SQL
CLI_SELECT = H("0e0000000353454c45435420312041532061")  # SELECT 1 AS a
CLI_RESULT = H("0200000101011800000203646566000000016100000c3f000100000003810000000005000003fe000002000200000401"
               "3105000005fe00000200")
CLI_BAD_COLUMN = H("170000000353454c454354206e6f70652046524f4d2063615f6b76")
CLI_ERR_1054 = H("2a000001ff1e04233432533232556e6b6e6f776e20636f6c756d6e20276e6f70652720696e202753454c45435427")
CLI_SQL_PREPARE = H("1e000000035052455041524520732046524f4d202753454c454354203f202a203227")
CLI_PREPARED = H("1a000001000000020000001253746174656d656e74207072657061726564")
CLI_SQL_EXECUTE = H("1300000003455845435554452073205553494e47203231")  # EXECUTE s USING 21
CLI_EXEC_RESULT = H("0200000101011c00000203646566000000053f202a203200000c3f000300000003800000000005000003fe00000200"
                    "0300000402343205000005fe00000200")
CLI_INSERT_QUOTE = H("2600000003494e5345525420494e544f2063615f6b762056414c5545532028352c202769742727732729")
CLI_OK = H("0700000100010002000000")

# (request, answer) -> (method, statement, status, error)
PAIRS: list[tuple[bytes, bytes, tuple[str, str, str, str]]] = [
    (QUERY, RESULT, ("query", "SELECT ? + ?, ?", "ok", "")),
    (MISSING, ERR_1146, ("query", "SELECT * FROM ca_missing_0 WHERE secret = ?", "failed", "1146")),
    (INSERT, OK_1_ROW, ("query", "INSERT INTO ca_kv VALUES (?, ?)", "ok", "")),
    (PREPARE, PREPARE_OK, ("prepare", "PREPARE 4 FROM SELECT ? + ?, ? AS s", "ok", "")),
    (EXECUTE, EXECUTE_RESULT, ("execute", "SELECT ? + ?, ? AS s", "ok", "")),
    (PREPARE_BAD, ERR_1064, ("prepare", "PREPARE FROM SELEKT ? FROM nowhere WHERE x = ?", "failed", "1064")),
    (PREPARE_INSERT, PREPARE_INSERT_OK, ("prepare", "PREPARE 6 FROM INSERT INTO ca_dup VALUES (?, ?)", "ok", "")),
    (EXECUTE_INSERT, OK_1_ROW, ("execute", "INSERT INTO ca_dup VALUES (?, ?)", "ok", "")),
    (EXECUTE_INSERT, ERR_1062, ("execute", "INSERT INTO ca_dup VALUES (?, ?)", "failed", "1062")),
    (CLI_SELECT, CLI_RESULT, ("query", "SELECT ? AS a", "ok", "")),
    (CLI_BAD_COLUMN, CLI_ERR_1054, ("query", "SELECT nope FROM ca_kv", "failed", "1054")),
    (CLI_SQL_PREPARE, CLI_PREPARED, ("query", "PREPARE s FROM ?", "ok", "")),
    (CLI_SQL_EXECUTE, CLI_EXEC_RESULT, ("query", "EXECUTE s USING ?", "ok", "")),
    (CLI_INSERT_QUOTE, CLI_OK, ("query", "INSERT INTO ca_kv VALUES (?, ?)", "ok", "")),
]


def run_pairs(m: Mysql, bare: bool, conn: tuple[int, int, int] = K) -> list[tuple[str, str, str, str]]:
    out = []
    for req, rep, _ in PAIRS:
        for r in m.parse(conn, req[4:] if bare else req, rep, 0.002):
            out.append((r.method, r.statement, r.status, r.error))
    return out


def test_captured_pairs_as_the_client_writes_them_and_the_server_reads_them() -> None:
    want = [w for _, _, w in PAIRS]
    assert run_pairs(Mysql(Settings()), bare=False) == want
    assert run_pairs(Mysql(Settings()), bare=True) == want  # the payload the server read after the header


def test_the_handshake_close_quit_and_what_the_server_writes_are_not_requests() -> None:
    m = Mysql(Settings())
    for data in (GREETING, LOGIN, LOGIN[4:], CLOSE, CLOSE[4:], QUIT, QUIT[4:], RESULT, ERR_1146, PREPARE_OK,
                 OK_1_ROW, b"", b"\x03", QUERY[:4]):
        assert parse_command(data) is None, data.hex()
        assert m.parse(K, data, OK_1_ROW, 0.001) == []
    assert parse_command(b"\x0b\x00\x00\x00\x03\x00\x01SELECT 1") == mysql.Command(mysql.COM_QUERY, "SELECT 1")


def test_answers_as_the_node_agent_reads_them() -> None:
    assert parse_answer(ERR_1146) == mysql.Answer("failed", 1146, "42S02")
    assert parse_answer(PREPARE_OK) == mysql.Answer("ok", statement_id=4)
    assert parse_answer(OK_1_ROW) == parse_answer(RESULT) == parse_answer(CLI_RESULT) == mysql.Answer("ok")
    assert parse_answer(H("05000005fe00000200")).status == "ok"  # EOF
    assert parse_answer(ERR_1146[:4]).status == "ok"  # the header alone (the node agent's reading)
    assert parse_answer(ERR_1146[:5]) == mysql.Answer("failed")  # the code cut off
    # a result set of 300 columns: the count takes three bytes
    assert parse_answer(H("03000001fc2c01")).status == parse_answer(H("04000001fc2c0100")).status == "ok"
    for data in (b"", b"\x07\x00\x00", H("0700000000010002000000"),  # sequence 0: a command, not an answer
                 H("00000001"), H("05000001fb2f746d70"), H("0300000105aabb"), b"HTTP/1.1 200 OK\r\n"):
        assert parse_answer(data).status == "unknown", data.hex()


def test_an_execute_shows_its_prepared_statement_per_connection() -> None:
    m = Mysql(Settings())
    other = (1, 6, 9)
    assert [r.statement for r in m.parse(K, EXECUTE, EXECUTE_RESULT, 0.001)] == ["EXECUTE 4 /* unknown */"]
    m.parse(K, PREPARE, PREPARE_OK, 0.001)
    assert [r.statement for r in m.parse(K, EXECUTE, EXECUTE_RESULT, 0.001)] == ["SELECT ? + ?, ? AS s"]
    assert [r.statement for r in m.parse(other, EXECUTE, EXECUTE_RESULT, 0.001)] == ["EXECUTE 4 /* unknown */"]
    assert m.parse(K, CLOSE, b"", 0.001) == []  # not a request; the statement stays until it falls out


def test_prepared_statements_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mysql, "MAX_STATEMENTS", 3)
    m = Mysql(Settings())
    for fd in range(5):  # five connections prepare statement 4
        m.parse((1, fd, 9), PREPARE, PREPARE_OK, 0.001)
    assert len(m._statements) == 3
    got = [m.parse((1, fd, 9), EXECUTE, EXECUTE_RESULT, 0.001)[0].statement for fd in range(5)]
    assert got == ["EXECUTE 4 /* unknown */"] * 2 + ["SELECT ? + ?, ? AS s"] * 3


def test_masks_off_keeps_literals_and_a_cut_statement_shows_it() -> None:
    m = Mysql(Settings(masks=Masks(sql_literals=False)))
    assert [r.statement for r in m.parse(K, QUERY, RESULT, 0.001)] == ["SELECT 0 + 1, 'secret-0'"]
    m.parse(K, PREPARE, PREPARE_OK, 0.001)
    assert [r.statement for r in m.parse(K, EXECUTE, EXECUTE_RESULT, 0.001)] == ["SELECT ? + 1, 'abc' AS s"]
    masked = Mysql(Settings())
    assert [r.statement for r in masked.parse(K, QUERY[:17], RESULT, 0.001)] == ["SELECT ? + ?..."]
    assert [r.statement for r in masked.parse(K, QUERY[:22], RESULT, 0.001)] == ["SELECT ? + ?, ?..."]  # in a string


def test_spans_are_named_query_with_the_masked_statement_and_the_error_code() -> None:
    m = Mysql(Settings())
    peer = Peer("127.0.0.1:3306", "127.0.0.1", 3306, "127.0.0.1")
    s = m.span(m.parse(K, MISSING, ERR_1146, 0.001)[0], peer, False)
    assert s is not None and (s.name, s.status, s.message) == ("query", "STATUS_CODE_ERROR", "1146")
    assert s.attributes == {"db.system": "mysql", "db.statement": "SELECT * FROM ca_missing_0 WHERE secret = ?"}
    s = m.span(m.parse(K, QUERY, RESULT, 0.001)[0], peer, False)
    assert s is not None and (s.name, s.status, s.message) == ("query", "STATUS_CODE_UNSET", "")
    s = m.span(m.parse(K, QUERY, b"", 0.001)[0], peer, False)
    assert s is not None and s.status == "STATUS_CODE_UNSET"


ALL_REQUESTS = [req for req, _, _ in PAIRS] + [CLOSE, QUIT, LOGIN]
ALL_ANSWERS = [rep for _, rep, _ in PAIRS] + [GREETING, LOGIN_OK]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_random_bytes_never_raise(req: bytes, rep: bytes) -> None:
    m = Mysql(Settings())
    for r in m.parse(K, req, rep, 0.001):
        assert r.status in ("ok", "failed", "unknown")
        m.span(r, Peer("a:1", "a", 1, "a"), False)
    parse_answer(req)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(ALL_REQUESTS), st.sampled_from(ALL_ANSWERS), st.integers(0, 200), st.integers(0, 200),
       st.booleans())
def test_truncated_real_frames_never_raise(req: bytes, rep: bytes, cut: int, cut2: int, bare: bool) -> None:
    req = req[4:] if bare else req
    m = Mysql(Settings())
    assert len(m.parse(K, req[:cut], rep[:cut2], 0.001)) <= 1
    assert len(m.parse(K, req[cut:], rep[cut2:], 0.001)) <= 1


# ---------------------------------------------------------- the kernel's detector, natively --

def detected(exe: Path, payloads: list[bytes]) -> list[int]:
    return [line[0] for line in detector_lines(exe, payloads)]


def test_the_kernel_claims_queries_prepares_and_executes_only(detector: Path) -> None:
    commands = list(range(256))
    framed = [bytes([9, 0, 0, 0, c]) + b"select 1" for c in commands]
    bare = [bytes([c]) + b"select 1" for c in commands]
    execute = [bytes([22, 0, 0, 0, c]) + EXECUTE[5:] for c in commands]
    want = [c in (mysql.COM_QUERY, mysql.COM_STMT_PREPARE) for c in commands]
    assert [d == contract.MYSQL for d in detected(detector, framed)] == want
    assert [d == contract.MYSQL for d in detected(detector, bare)] == want
    # a whole packet's length says it is one: its statement's bytes are not looked at
    want_framed = [c in (mysql.COM_QUERY, mysql.COM_STMT_PREPARE, mysql.COM_STMT_EXECUTE) for c in commands]
    assert [d == contract.MYSQL for d in detected(detector, execute)] == want_framed
    assert [bool(parse_command(f)) for f in framed] == want
    assert [bool(parse_command(f)) for f in execute] == want_framed
    # a payload read alone: control bytes in its first 16 are not text; tabs and line ends are
    controls = [*range(0x20), 0x7F]
    texts = [b"\x03SELECT " + bytes([c]) + b"1" for c in controls]
    ok = [c in (9, 10, 13) for c in controls]
    assert [d == contract.MYSQL for d in detected(detector, texts)] == ok
    assert [bool(parse_command(t)) for t in texts] == ok
    late = b"\x03SELECT 1, 2, 3, 4" + b"\x01"  # past the first 16 bytes: not looked at
    assert detected(detector, [late, b"\x16SELECT \xc3\xa9", b"\x03\x00\x01SELECT 1", b"\x16\x00\x01SELECT 1"]) == [
        contract.MYSQL, contract.MYSQL, contract.MYSQL, 0]  # query attributes: COM_QUERY only


def test_every_request_the_kernel_claims_the_parser_reads(detector: Path) -> None:
    """Real commands, whole and bare, cut and with bytes flipped: what the detector claims,
    the parser reads."""
    rnd = random.Random(5)
    cases = []
    for req in [r for r, _, _ in PAIRS]:
        for data in (req, req[4:]):
            cases += [data[:n] for n in range(len(data) + 1)]
            for _ in range(200):
                b = bytearray(data)
                for _ in range(rnd.randint(1, 3)):
                    b[rnd.randrange(len(b))] = rnd.randrange(256)
                cases.append(bytes(b))
    claims = [d == contract.MYSQL for d in detected(detector, cases)]
    assert sum(claims) > len(PAIRS) * 2
    missed = [c.hex() for c, k in zip(cases, claims, strict=True) if k and parse_command(c) is None]
    assert missed == []


def test_no_other_protocols_request_is_claimed(detector: Path) -> None:
    from agent.l7.protocols import PLUGINS

    others = [s for cls in PLUGINS if cls is not Mysql for s in (*cls.kernel_requests, *cls.kernel_non_requests)]
    assert contract.MYSQL not in detected(detector, others)
    assert all(parse_command(s) is None for s in others)


# ------------------------------------------------------------------- through the tracer --

ev = partial(paired, contract.MYSQL)


def test_the_tracer_counts_clients_and_servers_by_status_with_spans_for_clients() -> None:
    t, conns, rows = tracer()
    conns.add(100, 7, 55, "10.0.0.9", 3306, actual="10.0.0.10:3306")
    for req, rep, _ in PAIRS:
        t.handle_event(ev(F_OUTBOUND, req, rep))
        t.handle_event(ev(F_INBOUND, req[4:], rep, pid=200))  # the server's view
    t.handle_event(ev(F_OUTBOUND, LOGIN, LOGIN_OK))
    lbl = {"container_id": CID, "destination": "10.0.0.9:3306", "actual_destination": "10.0.0.10:3306"}
    assert value(t, "container_mysql_queries_total", status="ok", **lbl) == 10
    assert value(t, "container_mysql_queries_total", status="failed", **lbl) == 4
    assert value(t, "container_mysql_queries_duration_seconds_total_count", **lbl) == 14
    assert value(t, "container_mysql_inbound_queries_total", status="ok", container_id=CID) == 10
    assert value(t, "container_mysql_inbound_queries_total", status="failed", container_id=CID) == 4
    assert value(t, "container_mysql_inbound_queries_duration_seconds_total_count") == 14
    got = [(r["SpanName"], r["SpanAttributes"]["db.statement"], r["StatusCode"], r["StatusMessage"])
           for r in rows.rows]
    code = {"ok": "STATUS_CODE_UNSET", "failed": "STATUS_CODE_ERROR"}
    assert got == [("query", stmt, code[status], err) for _, _, (_, stmt, status, err) in PAIRS]
    assert all(r["Duration"] == 2_000_000 and r["SpanAttributes"]["db.system"] == "mysql"
               and r["SpanKind"] == "SPAN_KIND_CLIENT" for r in rows.rows)
