/* Postgres frontend messages: a simple Query ('Q' + length, the whole write), or the extended
 * protocol's Parse/Bind ... Sync written at once (its last five bytes are 'S' 0 0 0 4). `ptr`
 * is the user buffer of `size` bytes whose first `n` bytes are in `b`. */
#ifndef COROOT_AGENT_L7_POSTGRES_H
#define COROOT_AGENT_L7_POSTGRES_H

static __always_inline u32 l7_be32(u8 *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

static __always_inline int l7_postgres_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 5)
        return 0;
    if (b[0] == 'Q' && (u64)l7_be32(b + 1) + 1 == size)
        return 1;
    if ((b[0] == 'P' || b[0] == 'B') && l7_be32(b + 1) >= 4 && l7_be32(b + 1) < size) {
        u8 tail[5] = {};
        if (bpf_probe_read_user(tail, sizeof(tail), (void *)(ptr + size - 5)) < 0)
            return 0;
        return tail[0] == 'S' && tail[1] == 0 && tail[2] == 0 && tail[3] == 0 && tail[4] == 4;
    }
    return 0;
}

#endif
