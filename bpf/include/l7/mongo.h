/* MongoDB wire protocol: a message is a 16-byte header of little-endian int32s — messageLength,
 * requestID, responseTo, opCode — and its body. A request has responseTo 0 and is OP_MSG (2013),
 * the legacy OP_QUERY (2004) or OP_COMPRESSED (2012); replies (OP_MSG, OP_REPLY) have responseTo
 * set. A client writes a whole message at once (its length is the call's size); a server such
 * as mongod reads the header alone first (a call of 16 bytes). The first 16 bytes say it all:
 * straight-line code, no read beyond them. */
#ifndef COROOT_AGENT_L7_MONGO_H
#define COROOT_AGENT_L7_MONGO_H

#define L7_MONGO_OP_QUERY 2004
#define L7_MONGO_OP_COMPRESSED 2012
#define L7_MONGO_OP_MSG 2013
#define L7_MONGO_MAX_MESSAGE (48 * 1024 * 1024) /* the server's maxMessageSizeBytes */

static __always_inline u32 l7_le32(u8 *p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

static __always_inline int l7_mongo_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 16)
        return 0;
    u32 op = l7_le32(b + 12);
    if (l7_le32(b + 8) != 0 || (op != L7_MONGO_OP_MSG && op != L7_MONGO_OP_QUERY && op != L7_MONGO_OP_COMPRESSED))
        return 0;
    u32 len = l7_le32(b);
    /* the smallest request: header, flags and a section kind with an empty document */
    if (len < 16 + 4 + 1 + 5 || len > L7_MONGO_MAX_MESSAGE)
        return 0;
    return len == size || size == 16;
}

/* A read of a reply's 16-byte header alone (pymongo reads it first, then the body): its
 * responseTo is set and its opcode a reply's (OP_MSG, OP_REPLY 1, OP_COMPRESSED). */
static __always_inline int l7_mongo_response_header(u8 *b, u32 n, u64 size) {
    if (size != 16 || n < 16 || l7_le32(b + 8) == 0)
        return 0;
    u32 op = l7_le32(b + 12);
    return op == L7_MONGO_OP_MSG || op == 1 || op == L7_MONGO_OP_COMPRESSED;
}

#endif
