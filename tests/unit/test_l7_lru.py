"""The bounded map every L7 plug-in keeps its per-connection state in (agent/l7/protocol.py)."""

from __future__ import annotations

from agent.l7.protocol import Lru


def test_the_least_recently_put_or_used_goes_first_and_the_bound_holds() -> None:
    m: Lru[int, str] = Lru(3)
    for k in range(3):
        m.put(k, str(k))
    assert m.get(0) == "0"  # used: now the newest
    m.put(3, "3")  # one too many: 1, the least recently used, goes
    assert [k for k, _ in m.items()] == [2, 0, 3] and 1 not in m and len(m) == 3
    assert m.peek(2) == "2"  # a peek does not make it newer
    m.put(4, "4")
    assert [k for k, _ in m.items()] == [0, 3, 4]


def test_setdefault_makes_a_state_once_and_pop_forgets_it() -> None:
    made: list[list[int]] = []

    def factory() -> list[int]:
        made.append([])
        return made[-1]

    m: Lru[str, list[int]] = Lru(2)
    a = m.setdefault("a", factory)
    assert m.setdefault("a", factory) is a and len(made) == 1
    m.setdefault("b", factory)
    m.setdefault("a", factory)  # used again: "b" is now the oldest
    m.setdefault("c", factory)
    assert "b" not in m and "a" in m and len(made) == 3
    assert m.pop("a") is a and m.pop("a") is None and len(m) == 1
