"""`coroot-agent query` and /api/query: read-only SQL over the agent's own data, and nothing else.

A query is decided by ClickHouse's own parser, never by a pattern over the text:
1. `prescan`: a size cap and the text must be text (linear, no regular expressions).
2. The engine formats it: `SELECT formatQuerySingleLine('<the query as an escaped literal>')`.
   The parser refuses anything that is not exactly one statement, and what comes back is the
   canonical text: no comments, keywords spelled out, literals re-quoted.
3. `lexical_check` on the canonical text: no `;`, no `INTO OUTFILE`, no `FORMAT` clause.
4. `EXPLAIN AST` of the canonical text, walked by `check_ast`: a read kind (SELECT/WITH/UNION,
   SHOW TABLES, DESCRIBE, EXISTS, SHOW CREATE, EXPLAIN of these); table functions only from a
   short allowlist that reads nothing outside the store (`numbers`, ...); no SETTINGS clause;
   no function that reads files or sleeps; tables only from the agent's database and a few
   read-only system tables.
The canonical text is what runs, on the store's read session (readonly=1 with time, row, byte
and memory limits), which never shares a lock with inserts (agent/sinks/store.py). Both the
validator and the limits hold even if the other is wrong.

Local access goes through the agent's unix socket (root, or api_socket_group); TCP needs the
API key. This module validates and talks to the agent; it stores nothing itself.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Protocol

from agent.config import Config

if TYPE_CHECKING:
    from agent.api.server import ApiHandler

FORMATS = {"tsv": "TSVWithNames", "json": "JSONEachRow"}
LOCK_NAME = "agent.lock"
MAX_QUERY_BYTES = 64 * 1024

# What a read may be: the root node of its EXPLAIN AST.
READ_KINDS = frozenset({
    "SelectWithUnionQuery", "SelectIntersectExceptQuery", "ShowTables", "DescribeQuery",
    "ExistsTableQuery", "ExistsDatabaseQuery", "ExistsViewQuery", "ShowCreateTableQuery", "Explain",
})
ONLY_READS = "only read queries are allowed (SELECT, SHOW, DESCRIBE, EXPLAIN, WITH, EXISTS)"
READ_WORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
# Table functions that read nothing outside the store.
TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "generateseries",
                             "generate_series", "values", "null"})
# Functions that reach outside the store or hold the engine: refused wherever they appear.
DENIED_FUNCTIONS = frozenset({"file", "sleep", "sleepeachrow", "getsetting", "getserversetting",
                              "filesystemavailable", "filesystemcapacity", "filesystemunreserved",
                              "addresstoline", "addresstolinewithinlines", "addresstosymbol",
                              "demangle", "getmacro", "getclienthttpheader",
                              "globalvariable", "input", "url", "s3", "remote"})
DENIED_PREFIXES = ("dictget", "joinget", "dicthas", "dictisin")
# Read-only system tables that describe the store itself.
SYSTEM_TABLES = frozenset({"tables", "columns", "parts", "databases", "one", "numbers",
                           "functions", "data_type_families", "table_functions", "formats", "time_zones"})


class QueryRefused(Exception):
    """Not a read of the agent's own data; the message says why."""


# ----------------------------------------------------------------- the text ---


def prescan(sql: str) -> str:
    """Size cap, no NUL, trailing ';' and white space gone. Linear in the input."""
    size = len(sql.encode("utf-8", errors="replace"))
    if size > MAX_QUERY_BYTES:
        raise QueryRefused(f"the query is {size} bytes; at most {MAX_QUERY_BYTES} are accepted")
    if "\0" in sql:
        raise QueryRefused("the query contains a NUL byte")
    text = sql.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise QueryRefused("empty query")
    return text


def quote_literal(text: str) -> str:
    """`text` as a ClickHouse string literal: every backslash and quote escaped, so the literal
    ends at its own closing quote and nowhere else."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def words(text: str) -> list[str]:
    """The bare words and `;` of SQL text outside quotes and comments, in order. A linear scan
    of the canonical text the engine returns ('...' with backslash escapes and doubled quotes,
    "..." and `...` identifiers, -- and # line comments, nested /* */)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            i += 1
            while i < n:
                c = text[i]
                if c == "\\":
                    i += 2
                    continue
                if c == ch:
                    if i + 1 < n and text[i + 1] == ch:  # doubled quote
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif ch == "-" and text.startswith("--", i) or ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif ch == "/" and text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif ch.isalpha() or ch == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "_$"):
                j += 1
            out.append(text[i:j])
            i = j
        else:
            if ch == ";":
                out.append(";")
            i += 1
    return out


def first_word(text: str) -> str:
    """The statement's first word, refused at once unless it can start a read. Only a quick
    answer for the obvious cases: the engine's parser decides the rest."""
    return _read_start(words(text), required=False)


def _read_start(ws: list[str], required: bool) -> str:
    """The first of `ws`, refused unless it can start a read (or is absent and not `required`)."""
    first = ws[0].upper() if ws else ""
    if (first or required) and first not in READ_WORDS:
        raise QueryRefused(f"{ONLY_READS}; refused {first or 'this statement'}")
    return first


def lexical_check(canonical: str) -> None:
    """What the AST does not show reliably: a second statement, INTO OUTFILE, a FORMAT clause."""
    ws = words(canonical)
    if ";" in ws:
        raise QueryRefused("one statement at a time, please")
    _read_start(ws, required=True)
    upper = [w.upper() for w in ws]
    for a, b in zip(upper, upper[1:], strict=False):
        if a == "INTO" and b == "OUTFILE":
            raise QueryRefused("INTO OUTFILE is not allowed: the query would write a file")
    for a, b in zip(ws, ws[1:], strict=False):
        if a == "FORMAT" and b != ";":
            raise QueryRefused("a FORMAT clause is not allowed: use --format (or ?format=) tsv|json")


# ------------------------------------------------------------------ the AST ---


@dataclass
class Node:
    kind: str
    text: str  # the whole line without indentation
    children: list[Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The word after the kind: a function's or table's name."""
        parts = self.text.split()
        return parts[1] if len(parts) > 1 else ""


def parse_explain(text: str) -> Node:
    """EXPLAIN AST output (one node a line, one space of indentation a level) as a tree."""
    root: Node | None = None
    stack: list[tuple[int, Node]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip(" "))
        body = line.strip()
        node = Node(body.split()[0], body)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            stack[-1][1].children.append(node)
        elif root is None:
            root = node
        else:
            raise QueryRefused("the engine described more than one statement")
        stack.append((depth, node))
    if root is None:
        raise QueryRefused("the engine could not describe the query")
    return root


def check_ast(root: Node, database: str, databases: frozenset[str] = frozenset()) -> None:
    """Raise QueryRefused unless the tree is a read of `database` (and allowed system tables).
    `databases`: every database name the engine knows, so `db.table` in expressions (`x IN
    system.users`) is recognised as a table."""
    kind = root.kind
    if kind == "Explain":
        inner = [c for c in root.children if c.kind in READ_KINDS or c.kind.endswith("Query")]
        if not inner or any(c.kind not in READ_KINDS or c.kind == "Explain" for c in inner):
            raise QueryRefused("EXPLAIN only of a read query")
    elif kind not in READ_KINDS:
        raise QueryRefused(f"{ONLY_READS}; refused {_statement_name(kind)}")
    if kind in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
        for c in root.children:
            if c.kind == "Literal":
                raise QueryRefused("INTO OUTFILE is not allowed: the query would write a file")
    others = {d.lower() for d in databases} - {database.lower()}
    _walk(root, None, database, others)


def _statement_name(kind: str) -> str:
    for suffix in ("Query", "Statement"):
        if kind.endswith(suffix) and kind != suffix:
            kind = kind[: -len(suffix)]
    return kind.upper() or "this statement"


def _walk(node: Node, parent: Node | None, database: str, others: set[str]) -> None:
    k = node.kind
    if k in ("Set", "SetQuery"):
        raise QueryRefused("SETTINGS are not allowed in a query: the agent sets the limits")
    if k == "Function":
        name = node.name.lower()
        if parent is not None and parent.kind == "TableExpression":
            if name not in TABLE_FUNCTIONS:
                raise QueryRefused(f"table function {node.name}() is not allowed: only "
                                   f"{', '.join(sorted(TABLE_FUNCTIONS))} (queries read the agent's own tables)")
        elif name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
            raise QueryRefused(f"function {node.name}() is not allowed in a query")
    elif k == "TableIdentifier":
        _check_table(node.name, database)
    elif k == "Identifier" and "." in node.name:
        first = node.name.split(".", 1)[0].strip("`\"").lower()
        if first in others:
            _check_table(node.name, database)
    for c in node.children:
        _walk(c, node, database, others)


def _check_table(name: str, database: str) -> None:
    parts = [p.strip("`\"") for p in name.split(".")]
    if len(parts) == 1:
        return  # the current database (the agent's) or a WITH name
    db, table = parts[0], parts[1]
    if db == database:
        return
    if db.lower() == "system" and table.lower() in SYSTEM_TABLES:
        return
    raise QueryRefused(f"table {db}.{table} is outside the agent's database {database!r} "
                       f"(system tables allowed: {', '.join(sorted(SYSTEM_TABLES))})")


# ----------------------------------------------------------- the validator ---

Engine = Callable[[str], str]  # runs one statement of ours on the read session, returns TSVRaw text


def validate(sql: str, engine: Engine, database: str) -> str:
    """The canonical text of `sql` if it is a read of the agent's data; QueryRefused otherwise.
    `engine` runs only statements built here: the user's text reaches it as a quoted literal,
    then (canonical, one statement, checked) after EXPLAIN AST."""
    text = prescan(sql)
    try:
        canonical = engine(f"SELECT formatQuerySingleLine({quote_literal(text)})").rstrip("\n")
    except EngineError as e:
        raise QueryRefused(_engine_reason(str(e))) from None
    if not canonical.strip():
        raise QueryRefused("empty query")
    lexical_check(canonical)
    try:
        ast = engine(f"EXPLAIN AST {canonical}")
        names = engine("SELECT name FROM system.databases")
    except EngineError as e:
        raise QueryRefused(_engine_reason(str(e))) from None
    check_ast(parse_explain(ast), database, frozenset(names.split()))
    return canonical


class EngineError(Exception):
    """The engine refused one of the validator's statements (usually: a syntax error)."""


def _engine_reason(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "the engine refused it"
    if "Empty query" in first or "Empty query" in text:
        return "empty query"
    if "READONLY" in text or "readonly mode" in text:
        return "the query would change a setting or write: only reads of the agent's data run here"
    if "Multi-statements are not allowed" in text:
        return "one statement at a time, please"
    if "SYNTAX_ERROR" in text or "Syntax error" in text:
        at = first.find("Syntax error")
        return "syntax error: " + (first[at + len("Syntax error"):].lstrip(": ")[:300] if at >= 0 else first[:300])
    return first[:300]


# ----------------------------------------------------------------- the lock ---


@dataclass
class StoreLock:
    """Held by the agent that has the embedded store open; tells `query` where to ask."""

    path: str
    fd: int = -1

    @classmethod
    def for_config(cls, cfg: Config) -> StoreLock:
        return cls(os.path.join(cfg.storage_path, LOCK_NAME))

    def acquire(self, info: dict[str, object]) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd
        return True

    def update(self, info: dict[str, object]) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def holder(self) -> dict[str, object] | None:
        """What the current holder wrote, or None when nobody holds the lock. PermissionError
        when this user may not read it (the lock is root's)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it
            except BlockingIOError:
                pass
            data = os.read(fd, 4096)
            try:
                return json.loads(data) if data else {}
            except ValueError:
                return {}
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def socket_path(cfg: Config) -> str:
    return cfg.api_socket_path


# ---------------------------------------------------------------- the command --


def run(cfg: Config, sql: str, fmt: str, out: IO[bytes]) -> None:
    """Run `sql` and write its result to `out`. Raises QueryRefused or StoreError."""
    from agent.sinks.store import Store, StoreError

    stmt = prescan(sql)
    if fmt not in FORMATS:
        raise QueryRefused(f"--format must be one of {', '.join(FORMATS)}")
    first_word(stmt)  # an obvious write is refused before the store is touched
    if cfg.embedded_store:
        lock = StoreLock.for_config(cfg)
        try:
            holder = lock.holder()
        except PermissionError:
            raise StoreError(_no_access(cfg, lock.path)) from None
        if holder is not None:
            out.write(_via_agent(holder, cfg, stmt, fmt))
            return
        try:
            acquired = lock.acquire({"pid": os.getpid(), "query": True})
        except PermissionError:
            raise StoreError(_no_access(cfg, lock.path)) from None
        if not acquired:
            raise StoreError(f"the store at {cfg.storage_path} is busy; try again")
        try:
            store = Store(cfg)
            if not os.path.isdir(store.chdb_path):
                raise StoreError(f"no store at {store.chdb_path}: no agent has written there yet "
                                 "(check --storage-path)")
            try:
                out.write(store.query(stmt, FORMATS[fmt]))
            finally:
                store.close()
        finally:
            lock.release()
        return
    store = Store(cfg)
    try:
        out.write(store.query(stmt, FORMATS[fmt]))
    finally:
        store.close()


def _no_access(cfg: Config, path: str) -> str:
    group = getattr(cfg, "api_socket_group", "")
    who = f"root or a member of group {group!r}" if group else "root (or set api_socket_group)"
    return f"permission denied on {path}: the store and the agent's socket are for {who}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


def call_agent(sock: str, method: str, path: str, body: bytes | None = None,
               timeout: float = 60) -> tuple[int, bytes]:
    """One request to the agent over its unix socket: (status, body). OSError when it cannot."""
    conn = _UnixConnection(sock, timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "text/plain"} if body is not None else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _via_agent(holder: dict[str, object], cfg: Config, stmt: str, fmt: str) -> bytes:
    from agent.sinks.store import StoreError

    sock = str(holder.get("socket") or socket_path(cfg))
    try:
        status, data = call_agent(sock, "POST", f"/api/query?format={fmt}", stmt.encode())
    except PermissionError:
        raise StoreError(_no_access(cfg, sock)) from None
    except OSError as e:
        raise StoreError(f"the running agent (pid {holder.get('pid')}) holds the store but its socket "
                         f"{sock} does not answer: {e}") from None
    if status == 200:
        return data
    try:
        msg = str(json.loads(data).get("error", ""))
    except (ValueError, AttributeError):
        msg = data.decode(errors="replace").strip()[:300]
    if status == 400:
        raise QueryRefused(msg or "refused by the agent")
    if status == 403:
        raise StoreError(_no_access(cfg, sock) + (f" ({msg})" if msg else ""))
    raise StoreError(f"the running agent (pid {holder.get('pid')}) answered {status}: {msg}")


class QueryStore(Protocol):
    """What /api/query needs of the store (agent/sinks/store.py's Store)."""

    def query(self, sql: str, fmt: str = ...) -> bytes: ...


def api_handler(store: QueryStore) -> ApiHandler:
    """/api/query for a running agent: POST the SQL, ?format=tsv|json."""
    from urllib.parse import parse_qs

    from agent.api.server import Response
    from agent.sinks.store import StoreError

    def handle(query: str, body: bytes) -> Response:
        fmt = (parse_qs(query).get("format") or ["tsv"])[0]
        try:
            if fmt not in FORMATS:
                raise QueryRefused(f"format must be one of {', '.join(FORMATS)}")
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise QueryRefused("the query is not UTF-8 text") from None
            data = store.query(text, FORMATS[fmt])
        except QueryRefused as e:
            return Response(400, json.dumps({"error": str(e)}).encode() + b"\n")
        except StoreError as e:
            return Response(502, json.dumps({"error": str(e)}).encode() + b"\n")
        ctype = "text/tab-separated-values" if fmt == "tsv" else "application/x-ndjson"
        return Response(200, data, ctype)

    return handle
