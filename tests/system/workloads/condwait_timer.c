/* An LD_PRELOAD library for the GIL wait tests: times every pthread_cond_timedwait call of the
 * process it is loaded into (CLOCK_MONOTONIC around the C library's own function, reached with
 * dlvsym at the version programs link to, as the agent's probe is) and keeps the total, read
 * back with ctypes: condwait_total_ns(), condwait_calls(). It measures, in the process and with
 * its own clock, the wait the agent measures from the kernel. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

typedef int (*timedwait_fn)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);

static _Atomic(timedwait_fn) real;
static atomic_ullong total_ns, calls;

static unsigned long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

int pthread_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex, const struct timespec *abstime) {
    timedwait_fn f = atomic_load(&real);
    if (!f) {
        f = (timedwait_fn)dlvsym(RTLD_NEXT, "pthread_cond_timedwait", "GLIBC_2.3.2");
        atomic_store(&real, f);
    }
    unsigned long long t0 = now_ns();
    int ret = f(cond, mutex, abstime);
    atomic_fetch_add(&total_ns, now_ns() - t0);
    atomic_fetch_add(&calls, 1);
    return ret;
}

unsigned long long condwait_total_ns(void) { return atomic_load(&total_ns); }
unsigned long long condwait_calls(void) { return atomic_load(&calls); }
