/* FoundationDB, its flow transport (fdbrpc/FlowTransport.cpp): a connection opens with a
 * ConnectPacket — its length (u32, little-endian, not counting itself), the protocol version (u64,
 * 0x1fdb... with the object serializer flag: bytes 10 and 11 of the packet are 0xdb 0x1f), ports,
 * addresses — and then carries packets: a length (u32), an XXH3 checksum (u64; not on TLS
 * connections), the destination endpoint's token (16 bytes) and a flatbuffers message whose root
 * offset (u32) is followed by the message's file identifier (u32): a request's names its type
 * (GetValueRequest, CommitTransactionRequest, ...), a reply's is ErrorOr<reply type>, 2 << 24 | its.
 *
 * Recognised here, as the node agent recognises it: a packet whose file identifier is one of the
 * request (or interface) types below, at the start of the call, with or without a checksum, or
 * right after the ConnectPacket the same call begins with. One bounded read of 36 bytes, and only
 * for a call whose first bytes could begin a packet or a ConnectPacket.
 * Requests are in flight together on one connection and answered in any order, each reply sent to
 * the token of its request's reply promise: a FoundationDB connection is a stream connection
 * (l7_streamed in protocols.h), its calls paired in user space (agent/l7/foundationdb.py). */
#ifndef COROOT_AGENT_L7_FOUNDATIONDB_H
#define COROOT_AGENT_L7_FOUNDATIONDB_H

#define L7_FDB_PACKET_LIMIT (100 * 1024 * 1024) /* FLOW_KNOBS->PACKET_LIMIT */
#define L7_FDB_HEAD 36                          /* length, checksum, token, root offset, file identifier */

/* The file identifiers of requests and interfaces the node agent recognises. */
static __always_inline int l7_fdb_request_id(u32 id) {
    switch (id) {
    case 8454530: case 6795746: case 6795747: case 93948: case 838566: case 7554186: case 8500026:
    case 10457870: case 14747733: /* reads, writes, commits, read versions, watches */
    case 214728: case 2828131: case 9144680: case 9467439: case 9467438: /* database coordination */
    case 14332605: case 1254174: case 905920: case 16665642: case 8265613: case 10344153: case 15604392:
    case 6416816: /* workers and recruitment */
    case 4022206: case 11001131: case 10072821: case 13290999: /* transaction logs, storage metrics */
    case 14419140: case 4707015: case 10624019: case 4146513: /* status, ping, echo, network test */
    case 72435: case 5838547: case 2567474: case 1985879: case 4149140: case 4150141: case 2508597:
    case 905381: case 4844288: case 7932681: case 4980139: /* blob granules */
    case 4180191: case 2378138: case 923040: case 103841: case 178935: case 601281: case 3104275:
    case 2323417: /* encryption, configuration, consistency scan */
    case 15302073: case 8743216: case 8954922: case 5979145: case 5983305: case 12383874: case 16308510:
    case 1755944: case 8358753: case 369169: case 1303419: case 4983265: case 14712718: case 15888863:
    case 985636: /* interfaces */
        return 1;
    default:
        return 0;
    }
}

static __always_inline u32 l7_fdb_u32(u8 *p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

/* A request packet at ptr + off, in a call of `size` bytes from ptr. */
static __always_inline int l7_fdb_packet(u64 ptr, u64 off, u64 size) {
    u8 p[L7_FDB_HEAD] = {};
    if (off + L7_FDB_HEAD > size || bpf_probe_read_user(p, sizeof(p), (void *)(ptr + off)) < 0)
        return 0;
    u32 len = l7_fdb_u32(p);
    if (len < 24 || len > L7_FDB_PACKET_LIMIT)
        return 0;
    u32 root = l7_fdb_u32(p + 28); /* with a checksum */
    if (root >= 8 && root < len && l7_fdb_request_id(l7_fdb_u32(p + 32)))
        return 1;
    root = l7_fdb_u32(p + 20); /* TLS: no checksum */
    return root >= 8 && root < len && l7_fdb_request_id(l7_fdb_u32(p + 24));
}

static __always_inline int l7_foundationdb_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 16 || size < L7_FDB_HEAD)
        return 0;
    if (b[9] == 0 && b[10] == 0xdb && b[11] == 0x1f) { /* a ConnectPacket, and what follows it */
        u32 clen = l7_fdb_u32(b);
        if (clen < 16 || clen > 128)
            return 0;
        return l7_fdb_packet(ptr, (u64)clen + 4, size);
    }
    u32 len = l7_fdb_u32(b); /* known without a read: most calls of other protocols stop here */
    if (len < 24 || len > L7_FDB_PACKET_LIMIT)
        return 0;
    return l7_fdb_packet(ptr, 0, size);
}

#endif
