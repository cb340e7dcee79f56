/* Dubbo2, Apache Dubbo's "dubbo" protocol (dubbo.apache.org, the Dubbo2 TCP protocol spec): every
 * message is a 16-byte header — magic 0xdabb, a flag byte (request 0x80, two-way 0x40, event
 * 0x20, the serialization id in the low 5 bits, never 0), a status byte (a response's), the
 * request id (int64), the body length (int32, big-endian) — and its body (Hessian2 by default:
 * service, method, arguments).
 *
 * Recognised here, as the node agent recognises it: a two-way request that is no event (a
 * heartbeat is one), as the first message of a call: either the whole message fits in the call,
 * or the call is the header alone (a client may write it, a server read it, on its own). The
 * first 16 bytes say it all: no read beyond them. Requests in flight together on one connection
 * are answered by request id: a Dubbo2 connection is a stream connection (l7_streamed in
 * protocols.h), its calls paired in user space (agent/l7/dubbo2.py). */
#ifndef COROOT_AGENT_L7_DUBBO2_H
#define COROOT_AGENT_L7_DUBBO2_H

#define L7_DUBBO2_REQUEST 0x80
#define L7_DUBBO2_TWO_WAY 0x40
#define L7_DUBBO2_EVENT 0x20
#define L7_DUBBO2_SERIALIZATION 0x1f

static __always_inline int l7_dubbo2_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 16 || b[0] != 0xda || b[1] != 0xbb)
        return 0;
    u8 f = b[2];
    if (!(f & L7_DUBBO2_SERIALIZATION) || !(f & L7_DUBBO2_REQUEST) || !(f & L7_DUBBO2_TWO_WAY) ||
        (f & L7_DUBBO2_EVENT) || (b[12] & 0x80))
        return 0;
    u32 len = ((u32)b[12] << 24) | ((u32)b[13] << 16) | ((u32)b[14] << 8) | b[15];
    return size == 16 || (u64)len + 16 <= size;
}

#endif
