/* CPU profiler: a software cpu-clock perf event on every CPU at CA_PROFILING_HZ calls
 * on_cpu_sample, which counts samples per (pid, user stack, kernel stack) in the kernel.
 *
 * Two count maps: user space flips `profile_active` and drains the map that was active before,
 * so samples taken during a drain land in the other map and none is lost. Only processes in
 * `profile_pids` are sampled: the agent's registry keeps it to the processes of reported
 * containers that did not opt out (COROOT_EBPF_PROFILING=disabled), so for the others no
 * sample is even counted.
 * Reads helper results only. */
#include "common.h"
#include <uapi/linux/bpf_perf_event.h>

#ifndef CA_PROFILE_STACKS
#define CA_PROFILE_STACKS 16384 /* distinct stacks between two drains */
#endif
#ifndef CA_PROFILE_COUNTS
#define CA_PROFILE_COUNTS 32768 /* distinct (pid, stack pair) between two drains */
#endif

struct profile_key {
    u32 pid;
    s32 user_stack;
    s32 kernel_stack;
    u32 _pad;
};

BPF_STACK_TRACE(profile_stacks, CA_PROFILE_STACKS);
BPF_HASH(profile_counts0, struct profile_key, u64, CA_PROFILE_COUNTS);
BPF_HASH(profile_counts1, struct profile_key, u64, CA_PROFILE_COUNTS);
BPF_ARRAY(profile_active, u32, 1);
BPF_HASH(profile_pids, u32, u8, 65536);
BPF_PERCPU_ARRAY(profile_dropped, u64, 1); /* a count map was full */

/* Insert-if-absent below, so two CPUs seeing a new stack at once cannot overwrite each other;
 * written out per map because BCC rewrites map methods only on the map itself. */
int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u32 pid = ca_tgid();
    if (pid == 0)
        return 0; /* idle */
    if (!profile_pids.lookup(&pid))
        return 0;
    struct profile_key key = {.pid = pid};
    key.user_stack = profile_stacks.get_stackid(&ctx->regs, BPF_F_USER_STACK);
    key.kernel_stack = profile_stacks.get_stackid(&ctx->regs, 0);
    int zero = 0;
    u32 *active = profile_active.lookup(&zero);
    if (active && *active) {
        u64 *count = profile_counts1.lookup(&key);
        if (!count) {
            u64 one = 1;
            if (profile_counts1.insert(&key, &one) == 0)
                return 0;
            count = profile_counts1.lookup(&key);
        }
        if (count)
            __sync_fetch_and_add(count, 1);
        else
            profile_dropped.increment(0);
        return 0;
    }
    u64 *count = profile_counts0.lookup(&key);
    if (!count) {
        u64 one = 1;
        if (profile_counts0.insert(&key, &one) == 0)
            return 0;
        count = profile_counts0.lookup(&key);
    }
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        profile_dropped.increment(0);
    return 0;
}
