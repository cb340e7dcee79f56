/* The native unwinder's exec workload, compiled by the test twice WITHOUT frame pointers
 * (gcc -O2 -fomit-frame-pointer -fno-inline), with -DTAG=_x -DPAD=64 and -DTAG=_y -DPAD=512:
 * the same code at the same addresses (the test checks), but every function's frame 8x bigger
 * in the second, so a rule of the first applied to the second's stack reads garbage.
 *   unwind_exec SECONDS [NEXT]   print "ready", wait for a line on stdin, burn SECONDS of CPU
 *                                time in main -> top -> mid -> leaf, then exec NEXT SECONDS
 *                                (same pid; run under `setarch -R`, the same addresses) or,
 *                                without NEXT, print "done" and wait for a line on stdin. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#ifndef PAD
#define PAD 64
#endif
#ifndef TAG
#define TAG _x
#endif
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define F(n) CAT(n, TAG)

volatile unsigned long sink;

__attribute__((noinline)) unsigned long F(leaf)(long n) {
    volatile long pad[PAD];
    pad[0] = n;
    pad[PAD - 1] = 1;
    for (long i = 0; i < pad[0]; i++)
        sink += i * 7;
    return sink + pad[PAD - 1];
}

__attribute__((noinline)) unsigned long F(mid)(long n) {
    volatile long pad[PAD];
    pad[0] = n;
    pad[PAD - 1] = 2;
    unsigned long r = F(leaf)(pad[0]);
    return r + pad[PAD - 1];
}

__attribute__((noinline)) unsigned long F(top)(long n) {
    volatile long pad[PAD];
    pad[0] = n;
    pad[PAD - 1] = 3;
    unsigned long r = F(mid)(pad[0]);
    return r ^ pad[PAD - 1];
}

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 0;
    double end = cpu_seconds() + atof(argv[1]);
    unsigned long r = 0;
    while (cpu_seconds() < end)
        for (int k = 0; k < 16; k++)
            r += F(top)(20000);
    if (argc > 2) {
        char *next[] = {argv[2], argv[1], NULL};
        execv(argv[2], next);
        return 3;
    }
    printf("done %lu\n", r & 1);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 0;
    return 0;
}
