"""The protobuf wire format, for the handful of runtime messages the clients exchange.

No generated code: a message is read into {field number: [values]} (varints as int,
length-delimited fields as bytes) and the caller knows which field is what. Malformed input
raises ValueError, never anything else.
"""

from __future__ import annotations

from collections import defaultdict

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


def decode(buf: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = defaultdict(list)
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == VARINT:
            v, i = _varint(buf, i)
            out[number].append(v)
        elif wire == LEN:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError(f"field {number}: {n} bytes announced, {len(buf) - i} left")
            out[number].append(bytes(buf[i : i + n]))
            i += n
        elif wire == I64:
            if i + 8 > len(buf):
                raise ValueError("truncated fixed64")
            out[number].append(int.from_bytes(buf[i : i + 8], "little"))
            i += 8
        elif wire == I32:
            if i + 4 > len(buf):
                raise ValueError("truncated fixed32")
            out[number].append(int.from_bytes(buf[i : i + 4], "little"))
            i += 4
        else:
            raise ValueError(f"field {number}: wire type {wire} not supported")
    return dict(out)


def first_bytes(msg: dict[int, list[int | bytes]], number: int) -> bytes:
    """The last occurrence wins, as protobuf merges a repeated scalar."""
    for v in reversed(msg.get(number, [])):
        if isinstance(v, bytes):
            return v
    return b""


def text(msg: dict[int, list[int | bytes]], number: int) -> str:
    return first_bytes(msg, number).decode("utf-8", errors="replace")


def entries(msg: dict[int, list[int | bytes]], number: int) -> list[tuple[bytes, bytes]]:
    """A map<K, V> field: each entry is a message with key = 1 and value = 2."""
    out = []
    for v in msg.get(number, []):
        if isinstance(v, bytes):
            e = decode(v)
            out.append((first_bytes(e, 1), first_bytes(e, 2)))
    return out


# ------------------------------------------------------------------ encoding ---


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    return _enc_varint(number << 3 | LEN) + _enc_varint(len(value)) + value


def field_str(number: int, value: str) -> bytes:
    return field_bytes(number, value.encode()) if value else b""


def field_map(number: int, items: dict[str, bytes]) -> bytes:
    """map<string, message>: `items` values are the encoded messages."""
    return b"".join(field_bytes(number, field_str(1, k) + field_bytes(2, v)) for k, v in items.items())


def field_str_map(number: int, items: dict[str, str]) -> bytes:
    return b"".join(field_bytes(number, field_str(1, k) + field_str(2, v)) for k, v in items.items())
