"""Fuzz the query validator against the real engine (chDB): mutated attack and read queries go
through Store.query exactly as /api/query sends them. A finding is a query that was accepted and
then wrote a file, read the secret file, changed the schema, or an exception other than a
refusal. Prints cases per second, accepted/refused counts and every finding.

    python bench/fuzz_query.py [--cases 100000] [--seconds 600] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent import config  # noqa: E402
from agent.query import QueryRefused  # noqa: E402
from agent.sinks.store import Store, StoreError  # noqa: E402

MARKER = "fuzz-secret-7f3a9c"
SEEDS = [
    "SELECT 1", "SELECT count() FROM otel_traces", "WITH x AS (SELECT 1) SELECT * FROM x",
    "SHOW TABLES", "DESCRIBE TABLE otel_logs", "EXPLAIN SELECT 1", "EXISTS TABLE metrics",
    "SELECT * FROM numbers(3)", "SELECT name FROM system.tables",
    "SELECT * FROM file('{secret}', 'LineAsString')", "SELECT file('{secret}')",
    "SELECT 'x' AS x INTO # c\nOUTFILE '{out}'", "SELECT 1 INTO OUTFILE '{out}' APPEND",
    "SELECT 1 AS \"a'\"; CREATE TABLE t (a Int8) ENGINE=Memory; SELECT ''",
    "SELECT 1; DROP TABLE otel_traces", "SELECT * FROM url('http://127.0.0.1:1/')",
    "SELECT sleepEachRow(1) FROM numbers(3)", "SELECT 1 SETTINGS readonly=0",
    "SELECT * FROM system.users", "SELECT 1 WHERE 1 IN system.users",
]
TOKENS = ["INTO", "OUTFILE", ";", "#", "--", "/*", "*/", "'", '"', "`", "\\", "\n", " ", "(", ")",
          "file(", "url(", "SETTINGS readonly=0", "FORMAT JSON", "system.users", "numbers(2)",
          "'{secret}'", "'{out}'", "DROP TABLE otel_traces", "SELECT", ",", "$$", "x", "1",
          "EXPLAIN", "INSERT INTO otel_logs", "UNION ALL SELECT", "JOIN", "AS", "\\'", "''"]


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(text))
        if op < 0.5:
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        elif op < 0.7 and text:
            end = min(len(text), pos + rng.randint(1, 5))
            text = text[:pos] + text[end:]
        elif op < 0.85:
            other = rng.choice(SEEDS)
            text = text[:pos] + other[rng.randint(0, len(other)):]
        else:
            text = text[:pos] + chr(rng.randint(0, 0x2FF)) + text[pos:]
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="fuzz-query-")
    secret, out = os.path.join(work, "secret"), os.path.join(work, "out")
    with open(secret, "w") as f:
        f.write(MARKER + "\n")
    seeds = [s.replace("{secret}", secret).replace("{out}", out) for s in SEEDS]
    store = Store(config.load({"storage_path": os.path.join(work, "store")}, {}, None))
    store.open()
    store.migrate()
    tables = store.query("SELECT name FROM system.tables WHERE database = 'coroot' ORDER BY name", "TSV")
    findings: list[str] = []
    accepted = refused = failed = n = 0
    t0 = time.monotonic()
    while n < a.cases and time.monotonic() - t0 < a.seconds:
        sql = mutate(rng, rng.choice(seeds)).replace("{secret}", secret).replace("{out}", out)
        n += 1
        try:
            data = store.query(sql, "TSV")
            accepted += 1
            if MARKER.encode() in data:
                findings.append(f"read the secret: {sql!r}")
        except QueryRefused:
            refused += 1
        except StoreError:
            failed += 1  # accepted by the validator, refused by the engine (limits, types, ...)
        except Exception as e:  # noqa: BLE001
            findings.append(f"{type(e).__name__}: {e} for {sql!r}")
        if os.path.exists(out):
            findings.append(f"wrote a file: {sql!r}")
            os.unlink(out)
        if n % 2000 == 0:
            now = store.query("SELECT name FROM system.tables WHERE database = 'coroot' ORDER BY name", "TSV")
            if now != tables:
                findings.append(f"the schema changed by case {n}")
                tables = now
            el = time.monotonic() - t0
            print(f"{n} cases, {n / el:.0f}/s, accepted {accepted}, engine-refused {failed}, "
                  f"refused {refused}, findings {len(findings)}", flush=True)
    el = time.monotonic() - t0
    store.close()
    print(f"query validator fuzz: {n} cases in {el:.0f} s ({n / el:.0f} cases/s); accepted {accepted} "
          f"(engine refused {failed} of those at run time), refused {refused}; findings {len(findings)}")
    for f in findings[:50]:
        print("FINDING", f)
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
