/* ZooKeeper (jute, ZooKeeper's zookeeper.jute): every message is a 4-byte big-endian length,
 * then its body. A request's body is its header (xid, op code) and the op's record, which for
 * most ops begins with the znode path (a 4-byte length, then the path, starting with '/').
 *
 * A client writes a whole frame at once; ZooKeeper's own server reads the length (4 bytes) and
 * then the body: a request is recognised framed (the length is the rest of the call) or as a
 * bare body. Not requests: the session's ConnectRequest (no header: its first 8 bytes, the
 * protocol version and the last zxid's high half, read as xid 0 and op 0), the auth and
 * set-watches packets (xids -4 and -8), watch notifications (xid -1, written by the server). A
 * ping (xid -2) is one, as the node agent counts it. User space reads the status from the
 * reply's err and pairs only a reply whose xid is the request's. */
#ifndef COROOT_AGENT_L7_ZOOKEEPER_H
#define COROOT_AGENT_L7_ZOOKEEPER_H

#define L7_ZK_PING_XID -2
#define L7_ZK_OP_PING 11
#define L7_ZK_OP_CLOSE -11
#define L7_ZK_OP_MULTI 14
#define L7_ZK_OP_MULTI_READ 22

static __always_inline int l7_zk_int(u8 *p) {
    return (int)(((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3]);
}

/* Ops whose record begins with a znode path: create, delete, exists, getData, setData, getACL,
 * setACL, getChildren, sync (1..9), getChildren2, check (12, 13), create2 (15), checkWatches,
 * removeWatches, createContainer, deleteContainer, createTTL (17..21), getEphemerals,
 * getAllChildrenNumber (103, 104), addWatch (106). */
static __always_inline int l7_zk_path_op(int op) {
    if (op >= 1 && op <= 21)
        return (0x3eb3feU >> op) & 1; /* bits 1..9, 12, 13, 15, 17..21 */
    return op == 103 || op == 104 || op == 106;
}

/* A request body: its xid, op, the int after them (a path's length, or a multi's first op), t:
 * the 4 bytes after that (the path's first byte, or the rest of that op's header), len: its
 * size. Every check returns at once: the verifier then follows one path per check, not one per
 * combination of their outcomes. */
static __always_inline int l7_zk_body(int xid, int op, int path, u8 *t, u64 len) {
    if (len == 8) /* a header alone: a ping, or closing the session */
        return (xid == L7_ZK_PING_XID && op == L7_ZK_OP_PING) || (xid >= 0 && op == L7_ZK_OP_CLOSE);
    if (xid < 0 || len < 13)
        return 0;
    if (op == L7_ZK_OP_MULTI || op == L7_ZK_OP_MULTI_READ) /* the first op's header (type, done 0, err -1) */
        return len >= 22 && l7_zk_path_op(path) && t[0] == 0 && t[1] == 0xff && t[2] == 0xff && t[3] == 0xff;
    if (!l7_zk_path_op(op) || path <= 0 || (u64)path + 12 > len)
        return 0;
    return t[0] == '/';
}

static __always_inline int l7_zookeeper_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 8 || size < 8)
        return 0;
    if ((u64)(u32)l7_zk_int(b) + 4 == size) { /* framed, as a client writes it: t is past b */
        u8 t[4] = {};
        if (size > 16 && bpf_probe_read_user(t, size >= 20 ? 4 : 1, (void *)(ptr + 16)) < 0)
            return 0;
        if (l7_zk_body(l7_zk_int(b + 4), l7_zk_int(b + 8), l7_zk_int(b + 12), t, size - 4))
            return 1;
    }
    /* a body the server read after its length (its xid may read as a length too) */
    return l7_zk_body(l7_zk_int(b), l7_zk_int(b + 4), l7_zk_int(b + 8), b + 12, size);
}

#endif
