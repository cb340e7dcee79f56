/* Kafka: a request is an int32 big-endian size, then its header — api key (int16), api version
 * (int16), correlation id (int32, not negative), client id (a nullable string: int16 length, -1
 * for null) — and its body. A client writes a whole request at once (its size is the call's),
 * or several pipelined ones (a server may read them at once): the first request fits in the
 * call. The client id, when there is one, begins with a printable byte (ZooKeeper's framed
 * requests, which look alike, have a path length's zero bytes there). The first 16 bytes say
 * it all: no read beyond them. Requests in flight together are answered by correlation id: a
 * Kafka connection is a stream connection (l7_streamed in protocols.h), paired in user space. */
#ifndef COROOT_AGENT_L7_KAFKA_H
#define COROOT_AGENT_L7_KAFKA_H

#define L7_KAFKA_MAX_API_KEY 92
#define L7_KAFKA_MAX_API_VERSION 20
#define L7_KAFKA_MAX_REQUEST (100 * 1024 * 1024) /* the broker's socket.request.max.bytes */

/* An api key and version pair (4 bytes) a request could carry. */
static __always_inline int l7_kafka_api(u8 *p) {
    return p[0] == 0 && p[1] <= L7_KAFKA_MAX_API_KEY && p[2] == 0 && p[3] <= L7_KAFKA_MAX_API_VERSION;
}

static __always_inline int l7_kafka_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 15 || !l7_kafka_api(b + 4) || (b[8] & 0x80))
        return 0;
    u32 len = ((u32)b[0] << 24) | ((u32)b[1] << 16) | ((u32)b[2] << 8) | b[3];
    if (len < 10 || len > L7_KAFKA_MAX_REQUEST || (u64)len + 4 > size)
        return 0;
    u32 client = ((u32)b[12] << 8) | b[13];
    return client == 0xffff || (client != 0 && client + 10 <= len && b[14] >= 0x20 && b[14] <= 0x7e);
}

#endif
