/* ClickHouse, the native protocol (TCP port 9000, 9440 with TLS; ClickHouse's src/Core/Protocol.h,
 * src/Server/TCPHandler.cpp): a packet is a varint type and its fields; strings are a varint
 * length and the bytes. A client's Query packet (type 1) is the query id (a string), then the
 * client info — the query kind (1 initial, 2 secondary), the initial user, the initial query id,
 * the initial address ("ip:port", or empty), the initial query's start time (8 bytes, from
 * protocol revision 54449 on), the interface (1 TCP ... 10) and more — then the settings, the
 * stage, the compression flag and the query's text. A client writes a Query on its own (the
 * empty Data block that ends the external tables follows in another write, or in the same one);
 * a server reads it with what followed it.
 *
 * Recognised here: a Query whose header, up to the interface, is one a client writes. The
 * length bytes of the strings lie at offsets the earlier lengths give: four bounded reads past
 * the first 16 bytes (every offset below L7_CH_MAX_OFFSET and inside the call), no loop. Both
 * layouts (with and without the start time) are taken: the interface byte is where either puts
 * it. Not requests: Hello, Data, Cancel, Ping, the addendum after Hello; a server's packets.
 * User space (agent/l7/clickhouse.py) reads the text and the reply's packet type. */
#ifndef COROOT_AGENT_L7_CLICKHOUSE_H
#define COROOT_AGENT_L7_CLICKHOUSE_H

#define L7_CH_CLIENT_QUERY 1
#define L7_CH_MIN_QUERY 32      /* the shortest Query a client writes, text included */
#define L7_CH_MAX_ID 127        /* query ids: a one-byte length (UUIDs are 36) */
#define L7_CH_MAX_USER 63       /* the initial user */
#define L7_CH_MAX_ADDRESS 48    /* "[v6]:port" */
#define L7_CH_MAX_INTERFACE 10  /* TCP, HTTP, GRPC, MySQL, PostgreSQL, local, interserver, Prometheus, ... */
#define L7_CH_MAX_OFFSET 400    /* the last read: 1 + 2 + 127 + 2 + 63 + 1 + 127 + 1 + 48, 9 bytes */

/* Reads len bytes at offset off of the call into dst: 0 if they are not all inside it. */
static __always_inline int l7_ch_read(void *dst, u32 len, u64 off, u64 size, u64 ptr) {
    if (off > L7_CH_MAX_OFFSET || off + len > size)
        return 0;
    return bpf_probe_read_user(dst, len, (void *)(ptr + off)) == 0;
}

/* From revision 54458 a client sends an addendum after the handshake, its quota key (a string):
 * clickhouse-driver writes it with the first Query, in one write. An empty one is one 0 byte. */
static __always_inline int l7_ch_addendum(u8 *b) {
    return b[0] == 0 && b[1] == L7_CH_CLIENT_QUERY;
}

static __always_inline int l7_clickhouse_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 16 || size < L7_CH_MIN_QUERY)
        return 0;
    u64 off = l7_ch_addendum(b); /* 1: the Query follows an empty addendum */
    u8 id = off ? b[2] : b[1];
    if ((off ? b[1] : b[0]) != L7_CH_CLIENT_QUERY || id > L7_CH_MAX_ID)
        return 0;
    off += 2 + (u64)id; /* past the query id */
    u8 kv[2] = {};           /* the query kind, the initial user's length */
    if (!l7_ch_read(kv, sizeof(kv), off, size, ptr))
        return 0;
    if ((kv[0] != 1 && kv[0] != 2) || kv[1] > L7_CH_MAX_USER)
        return 0;
    off += 2 + (u64)kv[1];
    u8 qid = 0; /* the initial query id's length */
    if (!l7_ch_read(&qid, 1, off, size, ptr) || qid > L7_CH_MAX_ID)
        return 0;
    off += 1 + (u64)qid;
    u8 addr[2] = {}; /* the initial address's length and first byte */
    if (!l7_ch_read(addr, sizeof(addr), off, size, ptr) || addr[0] > L7_CH_MAX_ADDRESS)
        return 0;
    if (addr[0] && !((addr[1] >= '0' && addr[1] <= '9') || addr[1] == '[' || addr[1] == ':'))
        return 0;
    off += 1 + (u64)addr[0];
    u8 t[9] = {}; /* the interface, or the start time and then the interface */
    if (!l7_ch_read(t, 1, off, size, ptr))
        return 0;
    if (t[0] >= 1 && t[0] <= L7_CH_MAX_INTERFACE)
        return 1;
    if (!l7_ch_read(t, sizeof(t), off, size, ptr))
        return 0;
    return t[8] >= 1 && t[8] <= L7_CH_MAX_INTERFACE;
}

#endif
