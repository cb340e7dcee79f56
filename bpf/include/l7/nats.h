/* NATS (the client protocol of docs.nats.io): text lines, operation names case-insensitive. A
 * client publishes with "PUB <subject> [reply-to] <#bytes>\r\n<payload>\r\n" (HPUB: with
 * headers) and is given "MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n" (HMSG).
 * One-way messages (l7_message in protocols.h): a call is one when it starts with such an
 * operation, or with the short "+OK", "PING" or "PONG" line the server may write just before
 * one, and ends a line, as every whole NATS write and read does. User space counts each
 * message in the call's captured bytes. */
#ifndef COROOT_AGENT_L7_NATS_H
#define COROOT_AGENT_L7_NATS_H

/* The separator after an operation's name and the first byte of its subject. */
static __always_inline int l7_nats_args(u8 sep, u8 subject) {
    return (sep == ' ' || sep == '\t') && subject > ' ' && subject < 0x7f;
}

/* A message operation in the first 6 bytes of b: its name, a space or tab, a subject. Plain chains
 * of comparisons that each return: computing the answer with bitwise operations instead cost
 * the verifier ten times the states (this runs in every read and write hook). Every byte is
 * loaded first: a compiler that picks which byte to load by the name's length makes a variable
 * stack offset, which the verifier refuses. */
static __always_inline int l7_nats_op(u8 *b) {
    u8 b3 = b[3], b4 = b[4], b5 = b[5];
    u8 c0 = b[0] | 0x20, c1 = b[1] | 0x20, c2 = b[2] | 0x20, c3 = b3 | 0x20;
    if (c0 == 'p' && c1 == 'u' && c2 == 'b')
        return l7_nats_args(b3, b4);
    if (c0 == 'm' && c1 == 's' && c2 == 'g')
        return l7_nats_args(b3, b4);
    if (c0 == 'h' && c1 == 'p' && c2 == 'u' && c3 == 'b')
        return l7_nats_args(b4, b5);
    if (c0 == 'h' && c1 == 'm' && c2 == 's' && c3 == 'g')
        return l7_nats_args(b4, b5);
    return 0;
}

static __always_inline int l7_nats_message(u8 *b, u32 n, u64 size, u64 ptr) {
    if (size < 8 || n < 6)
        return 0;
    if (!l7_nats_op(b)) {
        /* "+OK\r\n" (verbose mode) or "PING\r\n"/"PONG\r\n" read together with a message */
        u32 skip = 0;
        u8 c0 = b[0] | 0x20, c1 = b[1] | 0x20, c2 = b[2] | 0x20, c3 = b[3] | 0x20;
        if (b[0] == '+' && c1 == 'o' && c2 == 'k' && b[3] == '\r' && b[4] == '\n')
            skip = 5;
        else if (c0 == 'p' && (c1 == 'i' || c1 == 'o') && c2 == 'n' && c3 == 'g' && b[4] == '\r' && b[5] == '\n')
            skip = 6;
        if (!skip || size < skip + 8)
            return 0;
        u8 next[6] = {};
        if (bpf_probe_read_user(next, sizeof(next), (void *)(ptr + skip)) < 0 || !l7_nats_op(next))
            return 0;
    }
    u8 end[2] = {};
    if (bpf_probe_read_user(end, sizeof(end), (void *)(ptr + size - 2)) < 0)
        return 0;
    return end[0] == '\r' && end[1] == '\n';
}

#endif
