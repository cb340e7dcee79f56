/* Memcached (the text and binary protocols of memcached's doc/protocol.txt and
 * doc/protocol-binary.txt).
 *
 * Text: a command is a line, "<command> <key>* <args> [noreply]\r\n"; the storage commands (set,
 * add, replace, append, prepend, cas) are followed by their data block and "\r\n". Binary: every
 * message has a 24-byte header — magic (0x80 request, 0x81 response), opcode, key length (2,
 * big-endian), extras length, data type (0), vbucket or status (2), total body length (4), opaque
 * (4), CAS (8) — then extras, key and value.
 *
 * A command that asks for no reply ("noreply", or a binary quiet opcode: SetQ, GetKQ, ...) is
 * not answered when it succeeds, so it must not wait for a response: a call whose first command
 * line ends in "noreply", or whose frames are all quiet, is a one-way message (l7_message in
 * protocols.h, tried first: an event at once); any other call starting with a command is a
 * request (l7_detect), paired with its response. User space reads every command of a pipeline
 * from the captured bytes. Meta commands (mg, ms, ...) and stats/version/verbosity are not
 * recognised.
 *
 * Written for the verifier: every check exits at once (return 0) instead of combining flags, and
 * the search for a line's end is arithmetic, so no branch depends on a value the verifier knows
 * and the paths do not multiply. Bytes are read at constant offsets only. */
#ifndef COROOT_AGENT_L7_MEMCACHED_H
#define COROOT_AGENT_L7_MEMCACHED_H

#define L7_MC_REQUEST 0x80     /* binary request magic */
#define L7_MC_LINE_CHUNKS 6    /* 32-byte reads looking for a command line's end: 192 bytes, keys to ~120 */
#define L7_MC_QUIET_FRAMES 4   /* frames walked to see that a binary call is all quiet */
#define L7_MC_MAX_OPCODE 0x24
/* binary opcodes counted as requests (bit i: opcode i): get, getq, getk, getkq, set, add,
 * replace, delete, increment, decrement, append, prepend and their quiet forms, flush(q), touch,
 * gat(q), gatk(q) — not quit, no-op, version, stat, verbosity or SASL */
#define L7_MC_OPCODES 0x18777ef37fULL
#define L7_MC_QUIET 0x10477e2200ULL /* the quiet ones among them */

#if defined(__clang__)
#define L7_MC_UNROLL _Pragma("unroll")
#else
#define L7_MC_UNROLL
#endif

/* A copy of the call's size that the verifier does not link to the caller's: what the checks
 * below learn of it (size >= 24, ...) would otherwise narrow the caller's register, and every
 * state narrowed differently makes the verifier walk the rest of the program (l7_stream,
 * l7_pend) again: measured, this header doubled the verifier's work on the L7 family without
 * this, and adds a fifth with it. An ALU instruction, not an empty asm: a register copy stays
 * linked to its source. */
static __always_inline u64 l7_mc_unlinked(u64 size) {
#if defined(__BPF_TRACING__) || defined(__BPF__) || defined(__bpf__)
    asm volatile("%0 |= 0" : "+r"(size));
#endif
    return size;
}

/* Bytes as little-endian words: the text checks compare whole words, and a byte is taken out of
 * a word by a shift (never a load at an offset that depends on which command matched). */
static __always_inline u64 l7_mc_le64(u8 *p) {
    return (u64)p[0] | ((u64)p[1] << 8) | ((u64)p[2] << 16) | ((u64)p[3] << 24) | ((u64)p[4] << 32) |
           ((u64)p[5] << 40) | ((u64)p[6] << 48) | ((u64)p[7] << 56);
}

#define L7_MC_C(c, i) ((u64)(u8)(c) << (8 * (i)))
#define L7_MC_S4(a, b, c, d) (L7_MC_C(a, 0) | L7_MC_C(b, 1) | L7_MC_C(c, 2) | L7_MC_C(d, 3))
#define L7_MC_S8(a, b, c, d, e, f, g, h) \
    (L7_MC_S4(a, b, c, d) | L7_MC_C(e, 4) | L7_MC_C(f, 5) | L7_MC_C(g, 6) | L7_MC_C(h, 7))
#define L7_MC_MASK(k) ((k) == 8 ? ~0ULL : (1ULL << (8 * (k))) - 1) /* the first k bytes */

/* byte i (0..7) of w is a key's (or gat's exptime's) first byte: no space or control character */
static __always_inline int l7_mc_key(u64 w, int i) {
    u64 c = (w >> (8 * i)) & 0xff;
    return c > ' ' && c != 0x7f;
}

/* A text command at b (16 bytes, the call's first n): 1 for get, gets, gat and gats, 2 for a
 * command that may end in "noreply", 0 for none. The word, its space, the key's first byte. */
static __always_inline int l7_mc_text(u8 *b, u32 n) {
    if (n < 5 || b[0] < 'a' || b[0] > 't') /* every command's first letter; HTTP's are upper case */
        return 0;
    u64 w = l7_mc_le64(b), w8 = l7_mc_le64(b + 8);
    u64 w4 = w & L7_MC_MASK(4), w5 = w & L7_MC_MASK(5);
    if (w4 == L7_MC_S4('g', 'e', 't', ' ') || w4 == L7_MC_S4('g', 'a', 't', ' '))
        return l7_mc_key(w, 4) ? 1 : 0;
    if (w5 == (L7_MC_S4('g', 'e', 't', 's') | L7_MC_C(' ', 4)) ||
        w5 == (L7_MC_S4('g', 'a', 't', 's') | L7_MC_C(' ', 4)))
        return l7_mc_key(w, 5) ? 1 : 0;
    if (w4 == L7_MC_S4('s', 'e', 't', ' ') || w4 == L7_MC_S4('a', 'd', 'd', ' ') || w4 == L7_MC_S4('c', 'a', 's', ' '))
        return l7_mc_key(w, 4) ? 2 : 0;
    if (w5 == (L7_MC_S4('i', 'n', 'c', 'r') | L7_MC_C(' ', 4)) ||
        w5 == (L7_MC_S4('d', 'e', 'c', 'r') | L7_MC_C(' ', 4)))
        return l7_mc_key(w, 5) ? 2 : 0;
    if ((w & L7_MC_MASK(6)) == (L7_MC_S4('t', 'o', 'u', 'c') | L7_MC_C('h', 4) | L7_MC_C(' ', 5)))
        return l7_mc_key(w, 6) ? 2 : 0;
    u64 w7 = w & L7_MC_MASK(7);
    if (w7 == (L7_MC_S4('a', 'p', 'p', 'e') | L7_MC_C('n', 4) | L7_MC_C('d', 5) | L7_MC_C(' ', 6)) ||
        w7 == (L7_MC_S4('d', 'e', 'l', 'e') | L7_MC_C('t', 4) | L7_MC_C('e', 5) | L7_MC_C(' ', 6)))
        return l7_mc_key(w, 7) ? 2 : 0;
    if (w == L7_MC_S8('r', 'e', 'p', 'l', 'a', 'c', 'e', ' ') || w == L7_MC_S8('p', 'r', 'e', 'p', 'e', 'n', 'd', ' '))
        return l7_mc_key(w8, 0) ? 2 : 0;
    if (w == L7_MC_S8('f', 'l', 'u', 's', 'h', '_', 'a', 'l') &&
        ((w8 & L7_MC_MASK(2)) == (L7_MC_C('l', 0) | L7_MC_C(' ', 1)) ||
         (w8 & L7_MC_MASK(3)) == (L7_MC_C('l', 0) | L7_MC_C('\r', 1) | L7_MC_C('\n', 2))))
        return 2;
    return 0;
}

static __always_inline u32 l7_mc_be32(u8 *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

/* The first 12 bytes of a binary request's header at h: a counted opcode (`mask`: its bit set)
 * whose lengths fit. */
static __always_inline int l7_mc_binary(u8 *h, u64 mask) {
    u32 op = h[1], extlen = h[4];
    u32 keylen = ((u32)h[2] << 8) | h[3];
    if (h[0] != L7_MC_REQUEST || op > L7_MC_MAX_OPCODE || h[5] != 0 || keylen > 250)
        return 0;
    if (!((mask >> op) & 1))
        return 0;
    if (extlen != 0 && extlen != 4 && extlen != 8 && extlen != 20)
        return 0;
    return extlen + keylen <= l7_mc_be32(h + 8);
}

/* A request that waits for its response (l7_detect): a text command, or a binary request. */
static __always_inline int l7_memcached_request(u8 *b, u32 n, u64 size, u64 ptr) {
    size = l7_mc_unlinked(size);
    if (b[0] == L7_MC_REQUEST)
        return n >= 12 && size >= 24 && l7_mc_binary(b, L7_MC_OPCODES);
    return l7_mc_text(b, n) != 0;
}

/* Nonzero when one of the 8 bytes of w is '\n'; its lowest set bit (0x80 << 8k) marks the first
 * one, byte k (little-endian, as BPF and the test's hosts are). */
static __always_inline u64 l7_mc_nl_bits(u64 w) {
    u64 x = w ^ 0x0a0a0a0a0a0a0a0aULL;
    return (x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL;
}

/* The offset of the first '\n' among the 8 bytes of w, or 64 for none (more than any offset in
 * a chunk, so a word without one never wins the minimum below). Arithmetic only. */
static __always_inline u64 l7_mc_nl(u64 w) {
    u64 m = l7_mc_nl_bits(w);
    u64 low = m & (~m + 1);                              /* 0x80 << 8k, or 0 */
    u64 k = ((low >> 7) * 0x0001020304050607ULL) >> 56; /* k (0 when m == 0) */
    u64 none = ((m | (~m + 1)) >> 63) ^ 1;               /* 1 when m == 0 */
    return k + (none << 6);
}

/* a < b ? a : b, for values below 2^62, without a branch */
static __always_inline u64 l7_mc_min(u64 a, u64 b) {
    u64 lt = (a - b) >> 63;
    return b ^ ((a ^ b) & (~lt + 1));
}

/* Whether the first line of the call at ptr (`size` bytes) ends in " noreply\r\n": the first
 * 32-byte chunk that holds a '\n' is found with a cheap test per chunk, then the position in it.
 * A chunk may reach past the call's bytes; a '\n' there is past `size` and does not count. */
static __always_inline int l7_mc_noreply_line(u64 size, u64 ptr) {
    u64 w[4];
    u64 off = 0;
    int found = 0;
    L7_MC_UNROLL
    for (int i = 0; i < L7_MC_LINE_CHUNKS; i++) {
        off = i * 32;
        if (off >= size || bpf_probe_read_user(w, sizeof(w), (void *)(ptr + off)) < 0)
            return 0;
        if (l7_mc_nl_bits(w[0]) | l7_mc_nl_bits(w[1]) | l7_mc_nl_bits(w[2]) | l7_mc_nl_bits(w[3])) {
            found = 1;
            break;
        }
    }
    if (!found)
        return 0;
    u64 end = off + l7_mc_min(l7_mc_min(l7_mc_nl(w[0]), 8 + l7_mc_nl(w[1])),
                              l7_mc_min(16 + l7_mc_nl(w[2]), 24 + l7_mc_nl(w[3])));
    if (end >= size || end < 9)
        return 0;
    u8 t[10];
    if (bpf_probe_read_user(t, sizeof(t), (void *)(ptr + end - 9)) < 0)
        return 0;
    return l7_mc_le64(t) == L7_MC_S8(' ', 'n', 'o', 'r', 'e', 'p', 'l', 'y') && t[8] == '\r' && t[9] == '\n';
}

/* Every frame of a binary call a quiet request (walking at most L7_MC_QUIET_FRAMES). */
static __always_inline int l7_mc_all_quiet(u8 *b, u64 size, u64 ptr) {
    if (!l7_mc_binary(b, L7_MC_QUIET))
        return 0;
    u64 off = 24 + (u64)l7_mc_be32(b + 8);
    L7_MC_UNROLL
    for (int i = 1; i < L7_MC_QUIET_FRAMES; i++) {
        if (off >= size)
            return 1;
        u8 h[12];
        if (size - off < sizeof(h) || bpf_probe_read_user(h, sizeof(h), (void *)(ptr + off)) < 0)
            return 0;
        if (!l7_mc_binary(h, L7_MC_QUIET))
            return 0;
        off += 24 + (u64)l7_mc_be32(h + 8);
    }
    return off >= size;
}

/* A call of commands that are never answered (l7_message): a text command line ending in
 * "noreply" first, or only binary quiet requests. Read and written: the server reads what the
 * client wrote. */
static __always_inline int l7_memcached_noreply(u8 *b, u32 n, u64 size, u64 ptr) {
    size = l7_mc_unlinked(size);
    if (b[0] == L7_MC_REQUEST)
        return n >= 12 && size >= 24 && l7_mc_all_quiet(b, size, ptr);
    return l7_mc_text(b, n) == 2 && l7_mc_noreply_line(size, ptr);
}

#endif
