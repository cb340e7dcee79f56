/* Profiler workloads, compiled by the tests with frame pointers.
 *   burn SECONDS      burn_alpha and burn_beta, the same loop with three times the iterations
 *                     for alpha (3:1 of CPU), until the process has used SECONDS of CPU time;
 *                     print own CPU time, then wait for a line on stdin
 *   syscalls SECONDS  read(2) from /dev/zero in a loop (kernel time) for SECONDS, then wait
 *   jit               run a tiny loop from an anonymous executable mapping named in
 *                     /tmp/perf-PID.map, as a JIT runtime would, until killed */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long sink_alpha, sink_beta;

/* The same body, and the same alignment (the loop's placement alone moved the split by 2-3
 * points on this machine's CPU): an iteration costs the same in either, so CPU time splits as
 * iterations do, 3:1. */
__attribute__((noinline, aligned(64))) void burn_alpha(long n) {
    for (long i = 0; i < n; i++)
        sink_alpha += i * 7;
}

__attribute__((noinline, aligned(64))) void burn_beta(long n) {
    for (long i = 0; i < n; i++)
        sink_beta += i * 7;
}

static double elapsed(struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void report_and_wait(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return;
}

int main(int argc, char **argv) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (argc > 2 && strcmp(argv[1], "burn") == 0) {
        double seconds = atof(argv[2]);
        unsigned int seed = (unsigned int)getpid();
        /* Short rounds of random length (~0.1 ms): no period a 99 Hz sampler or the
         * scheduler's tick could lock onto, so samples fall at independent points. */
        while (cpu_seconds() < seconds)
            for (int k = 0; k < 32; k++) {
                long n = 10000 + rand_r(&seed) % 20000;
                burn_alpha(3 * n);
                burn_beta(n);
            }
        report_and_wait();
    } else if (argc > 2 && strcmp(argv[1], "syscalls") == 0) {
        static char buf[1 << 20];
        int fd = open("/dev/zero", O_RDONLY);
        while (elapsed(&t0) < atof(argv[2]))
            if (read(fd, buf, sizeof buf) < 0)
                return 1;
        report_and_wait();
    } else if (argc > 1 && strcmp(argv[1], "jit") == 0) {
        unsigned char code[] = {0x48, 0xff, 0xc0, 0xeb, 0xfb}; /* inc rax; jmp back */
        void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memcpy(p, code, sizeof code);
        char path[64];
        snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
        FILE *f = fopen(path, "w");
        fprintf(f, "%lx 40 jitted_spin_loop\n", (unsigned long)p);
        fclose(f);
        printf("ready\n");
        fflush(stdout);
        ((void (*)(void))p)();
    }
    return 0;
}
