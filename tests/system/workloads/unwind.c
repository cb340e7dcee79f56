/* The native unwinder's workload, compiled by the test WITHOUT frame pointers
 * (gcc -O2 -fomit-frame-pointer -fno-inline):
 *   unwind SECONDS   print "ready", wait for a line on stdin (the test waits for the agent's
 *                    tables of this process to be in the kernel), then until the process
 *                    has used SECONDS of CPU time: main -> a -> b -> c, c
 *                    burning (3 parts), and main -> sort_it -> libc's qsort -> by_weight, the
 *                    comparison burning (1 part); print own CPU time, then wait for a line on
 *                    stdin.
 * Every function keeps stack of its own (a volatile array) and uses its callee's result after
 * the call, so that no call becomes a jump and each frame's CFA moves rsp by its own amount. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

volatile unsigned long sink;

__attribute__((noinline)) unsigned long c(long n) {
    volatile long pad[3] = {n, 0, 0};
    for (long i = 0; i < pad[0]; i++)
        sink += i * 7;
    return sink + pad[1];
}

__attribute__((noinline)) unsigned long b(long n) {
    volatile long pad[5] = {n, 1, 2, 3, 4};
    unsigned long r = c(pad[0]);
    return r + pad[4];
}

__attribute__((noinline)) unsigned long a(long n) {
    volatile long pad[9] = {n};
    unsigned long r = b(pad[0]);
    return r ^ pad[8];
}

static long cmp_work;

__attribute__((noinline)) int by_weight(const void *x, const void *y) {
    for (long i = 0; i < cmp_work; i++)
        sink += i * 7;
    long u = *(const long *)x, v = *(const long *)y;
    return (u > v) - (u < v);
}

__attribute__((noinline)) unsigned long sort_it(long *items, int n) {
    volatile long pad[7] = {n};
    qsort(items, (size_t)pad[0], sizeof(long), by_weight);
    return (unsigned long)items[0] + pad[6];
}

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    double seconds = atof(argv[2]);
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 0;
    unsigned int seed = 1;
    long items[64];
    cmp_work = 40;
    unsigned long r = 0;
    while (cpu_seconds() < seconds) {
        for (int k = 0; k < 16; k++) {
            r += a(3 * 20000);
            for (int i = 0; i < 64; i++)
                items[i] = rand_r(&seed);
            r += sort_it(items, 64); /* ~64 * 6 comparisons of ~40 iterations: ~15000 */
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%f %lu\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
           r & 1);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 0;
    return 0;
}
