/* Runs the kernel's L7 detectors (bpf/include/l7/) as a plain program, for the contract test:
 * one hex-encoded payload per line on stdin; per line it prints
 * "<l7_detect> <l7_dns_query> <l7_dns_answer> <l7_http_status> <l7_message>". */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

static long bpf_probe_read_user(void *dst, u32 n, const void *src) {
    memcpy(dst, src, n);
    return 0;
}

#include "l7/protocols.h"

static int unhex(int c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; }

int main(void) {
    static char line[1 << 16];
    static u8 buf[1 << 15];
    while (fgets(line, sizeof(line), stdin)) {
        size_t n = 0;
        for (char *p = line; p[0] && p[0] != '\n' && p[1]; p += 2)
            buf[n++] = (u8)(unhex(p[0]) << 4 | unhex(p[1]));
        u8 head[16] = {0};
        u32 hn = n < sizeof(head) ? (u32)n : sizeof(head);
        memcpy(head, buf, hn);
        printf("%u %d %d %u %u\n", l7_detect(head, hn, n, (u64)(uintptr_t)buf), l7_dns_query(head, hn),
               l7_dns_answer(head, hn), l7_http_status(head, hn), l7_message(head, hn, n, (u64)(uintptr_t)buf));
    }
    return 0;
}
