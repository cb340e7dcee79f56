"""`coroot-agent flamegraph`: read CPU profiles from the store and write a self-contained SVG
flame graph, or folded stacks ("root;...;leaf value" per line) for other viewers."""

from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass, field

from agent.config import Config
from agent.profiling.profiler import frame_name
from agent.units import parse_duration

WIDTH = 1200
ROW = 17


def profile_sql(service: str | None, since_seconds: float) -> str:
    where = f"p.Type = 'ebpf:cpu:nanoseconds' AND p.End >= now64(9) - toIntervalSecond({int(since_seconds)})"
    if service is not None:
        where += " AND p.ServiceName = '" + service.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return ("SELECT p.ServiceName AS service, s.Stack AS stack, sum(p.Value) AS value "
            "FROM profiling_samples AS p INNER JOIN (SELECT ServiceName, Hash, any(Stack) AS Stack "
            "FROM profiling_stacks GROUP BY ServiceName, Hash) AS s "
            "ON s.ServiceName = p.ServiceName AND s.Hash = p.StackHash "
            f"WHERE {where} GROUP BY service, stack")


def load(cfg: Config, service: str | None, since: str) -> dict[tuple[str, ...], int]:
    """Folded profile: root-first frame tuples -> nanoseconds of CPU. With no service given,
    every service's stacks are rooted at the service name."""
    from agent.query import run

    buf = io.BytesIO()
    run(cfg, profile_sql(service, parse_duration(since)), "json", buf)
    out: dict[tuple[str, ...], int] = {}
    for line in buf.getvalue().decode().splitlines():
        row = json.loads(line)
        frames = tuple(frame_name(f) for f in reversed(row["stack"]))  # stored leaf first
        if service is None:
            frames = (row["service"], *frames)
        out[frames] = out.get(frames, 0) + int(row["value"])
    return out


def folded(profile: dict[tuple[str, ...], int]) -> str:
    return "".join(f"{';'.join(f.replace(';', ':') for f in k)} {v}\n" for k, v in sorted(profile.items()))


@dataclass
class _Node:
    name: str
    value: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _tree(profile: dict[tuple[str, ...], int]) -> _Node:
    root = _Node("all")
    for frames, v in profile.items():
        node = root
        node.value += v
        for f in frames:
            node = node.children.setdefault(f, _Node(f))
            node.value += v
    return root


def _color(name: str) -> str:
    h = sum(ord(c) for c in name)
    if name.startswith("[unknown]"):
        return "rgb(180,180,180)"
    if re.match(r"^[a-z_0-9]+$", name) and not name.startswith("_"):
        return f"rgb({205 + h % 50},{100 + h % 80},{40 + h % 40})"
    return f"rgb({220 + h % 35},{150 + h % 60},{50 + h % 50})"


def svg(profile: dict[tuple[str, ...], int], title: str = "CPU") -> str:
    root = _tree(profile)
    total = max(root.value, 1)
    rects: list[str] = []
    depth_max = 0

    def draw(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        w = node.value / total * (WIDTH - 20)
        if w < 0.5:
            return
        depth_max = max(depth_max, depth)
        y = depth  # flipped below, once the height is known
        pct = node.value / total * 100
        label = html.escape(node.name)
        text = html.escape(node.name[: int(w / 7)]) if w > 21 else ""
        rects.append(f'<g><title>{label} ({node.value / 1e9:.2f} s, {pct:.2f}%)</title>'
                     f'<rect x="{x + 10:.1f}" y="@{y}@" width="{w:.1f}" height="{ROW - 1}" '
                     f'fill="{_color(node.name)}" rx="2"/>'
                     f'<text x="{x + 13:.1f}" y="@{y}t@" font-size="12">{text}</text></g>')
        cx = x
        for child in sorted(node.children.values(), key=lambda n: n.name):
            draw(child, cx, depth + 1)
            cx += child.value / total * (WIDTH - 20)

    draw(root, 0.0, 0)
    height = (depth_max + 1) * ROW + 50
    body = "\n".join(rects)

    def place(m: re.Match[str]) -> str:
        d = int(m.group(1))
        y = height - 20 - (d + 1) * ROW
        return str(y + (ROW - 5) if m.group(2) else y)

    body = re.sub(r"@(\d+)(t?)@", place, body)
    return (f'<?xml version="1.0" standalone="no"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'font-family="Verdana, sans-serif">\n'
            f'<rect width="100%" height="100%" fill="rgb(250,250,240)"/>\n'
            f'<text x="{WIDTH // 2}" y="20" text-anchor="middle" font-size="16">{html.escape(title)} '
            f'({total / 1e9:.2f} s of CPU)</text>\n{body}\n</svg>\n')
