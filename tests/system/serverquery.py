"""The Coroot server's reads as its driver sends them (clickhouse-go v2, client-side `@name`
binding, bind.go's format): strings quoted, arrays `[...]`, clickhouse.GroupSet `(...)` and
[]GroupSet joined without brackets, a DateNamed time with nanoseconds
`toDateTime64('<unix ns>', 9)`, bools 1/0, numbers as Go prints them (float64 5 as 5).
`@@table_x@@` is the server's placeholder for table x (x_distributed on a cluster; the table
itself on one node). Shared by tests/system/test_compat.py and test_store_migration.py, with the
flame graph query both run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DateNamed:
    """clickhouse.DateNamed(name, t, clickhouse.NanoSeconds) of a time in the Local zone: unix ns."""

    ns: int


class GroupSet(tuple):  # type: ignore[type-arg]
    """clickhouse.GroupSet{Value: [...]}: a tuple literal (a plain tuple is taken as one too)."""


def literal(v: Any) -> str:
    """A value as clickhouse-go writes it into the query text."""
    if isinstance(v, DateNamed):
        return f"toDateTime64('{v.ns}', 9)"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, tuple):
        return "(" + ", ".join(literal(x) for x in v) + ")"
    if isinstance(v, list):
        if v and all(isinstance(x, tuple) for x in v):  # []GroupSet: joined, no brackets
            return ", ".join(literal(x) for x in v)
        return "[" + ", ".join(literal(x) for x in v) + "]"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # Go prints float64 5 as 5
    if isinstance(v, int | float):
        return str(v)
    raise TypeError(type(v))


def bind(sql: str, **params: Any) -> str:
    """@@table_x@@ as on one node, then @name -> its literal (a missing one is an error)."""
    sql = re.sub(r"@@table_(\w+)@@", r"\1", sql)
    return re.sub(r"@[a-zA-Z0-9_]+", lambda m: literal(params[m.group(0)[1:]]), sql)


# The flame graph of one service: qSamples and qStacks joined (clickhouse/queries.go, getProfile
# in clickhouse/profiles.go); the per-instance one passes the container ids in @containers.
Q_SAMPLES = """
SELECT
    StackHash AS hash,
    sum(Value) AS value
FROM @@table_profiling_samples@@
WHERE
    ServiceName IN (@services) AND
    Type = @type AND
    Start < @to AND End > @from AND
    (empty(@containers) OR has(@containers, Labels['container.id'])) AND
    (@namespace = '' OR @namespace = Labels['namespace']) AND
    (@pod = '' OR @pod = Labels['pod'])
GROUP BY StackHash
HAVING value > 0
ORDER BY value DESC
LIMIT 5000
"""
Q_STACKS = """
SELECT
    Hash AS hash,
    any(Stack) AS stack
FROM @@table_profiling_stacks@@
WHERE
    ServiceName IN (@services) AND
    LastSeen > @from AND
    Hash GLOBAL IN (SELECT hash FROM samples)
GROUP BY Hash
"""
Q_PROFILE = f"WITH samples AS ({Q_SAMPLES}), stacks AS ({Q_STACKS}) SELECT value, stack FROM stacks JOIN samples USING(hash)"
