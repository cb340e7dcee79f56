/* Cassandra, the CQL native protocol (v3-v5; Cassandra's doc/native_protocol_v*.spec): a message
 * (an envelope in v5's words) is a 9-byte header — version (3..5; a response's has the high bit
 * set), flags (compression, tracing, custom payload, warning, beta: 0x1f at most), stream (int16,
 * a client's are not negative), opcode, body length (int32) — and its body. Requests in flight
 * together on one connection are answered by stream id: a CQL connection is a stream connection
 * (l7_streamed in protocols.h), its calls paired in user space (agent/l7/cassandra.py), which
 * also follows v5's framing (segments with CRC24 headers, LZ4-compressed or not) once the
 * handshake switches to it. A STARTUP that asks for compression is still a legacy envelope, so a
 * connection whose segments are compressed is recognised here by its OPTIONS or STARTUP like any
 * other; its compressed segments come after, to a stream connection, and are not detected here.
 *
 * Recognised here: the requests a client opens a connection with or sends in legacy framing —
 * OPTIONS, STARTUP, REGISTER, QUERY, PREPARE, EXECUTE, BATCH, AUTH_RESPONSE — as the first
 * message of a call (a client may write several at once; a server reads several at once). The
 * first 16 bytes say it all: no read beyond them. */
#ifndef COROOT_AGENT_L7_CASSANDRA_H
#define COROOT_AGENT_L7_CASSANDRA_H

#define L7_CQL_STARTUP 0x01
#define L7_CQL_OPTIONS 0x05
#define L7_CQL_QUERY 0x07
#define L7_CQL_PREPARE 0x09
#define L7_CQL_EXECUTE 0x0a
#define L7_CQL_REGISTER 0x0b
#define L7_CQL_BATCH 0x0d
#define L7_CQL_AUTH_RESPONSE 0x0f
#define L7_CQL_MAX_BODY (256 * 1024 * 1024) /* the server's native_transport_max_frame_size */

/* A request opcode: bits 1, 5, 7, 9, 10, 11, 13, 15 of 0xaea2. */
static __always_inline int l7_cql_request_op(u8 op) {
    return op <= 15 && ((0xaea2U >> op) & 1);
}

static __always_inline int l7_cassandra_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 9 || b[0] < 3 || b[0] > 5 || b[1] > 0x1f || (b[2] & 0x80) || !l7_cql_request_op(b[4]))
        return 0;
    u32 len = ((u32)b[5] << 24) | ((u32)b[6] << 16) | ((u32)b[7] << 8) | b[8];
    if (len > L7_CQL_MAX_BODY || (u64)len + 9 > size)
        return 0;
    if (b[4] == L7_CQL_OPTIONS)
        return len == 0;
    if (b[4] == L7_CQL_STARTUP || b[4] == L7_CQL_REGISTER) /* a string map, a string list: 2 bytes or more */
        return len >= 2;
    if ((b[4] == L7_CQL_QUERY || b[4] == L7_CQL_PREPARE) && !(b[1] & 0x05)) { /* a long string first */
        if (n < 13)
            return 0;
        u32 q = ((u32)b[9] << 24) | ((u32)b[10] << 16) | ((u32)b[11] << 8) | b[12];
        return q > 0 && (u64)q + 4 <= len;
    }
    return len >= 2; /* EXECUTE's id, BATCH's type and count, AUTH_RESPONSE's token */
}

#endif
