/* CPU profiler: a software cpu-clock perf event on every CPU at CA_PROFILING_HZ calls
 * on_cpu_sample, which counts samples per (pid, user stack, kernel stack) in the kernel.
 *
 * Two count maps: user space flips `profile_active` and drains the map that was active before,
 * so samples taken during a drain land in the other map and none is lost. Only processes in
 * `profile_pids` are sampled: the agent's registry keeps it to the processes of reported
 * containers that did not opt out (COROOT_EBPF_PROFILING=disabled), so for the others no
 * sample is even counted.
 *
 * CPython processes (in `py_procs`, with their interpreter's offsets) also get their Python
 * stack walked at the sample (bpf/include/pyframes.h): stored once per distinct stack in
 * `py_stacks` under a hash of its code-object addresses, which the count key carries; user
 * space puts those frames in place of the interpreter's eval-loop frames. */
#include "common.h"
#include "pyframes.h"
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
    u64 py_stack; /* key in py_stacks; 0: no Python frames */
};

BPF_STACK_TRACE(profile_stacks, CA_PROFILE_STACKS);
BPF_HASH(profile_counts0, struct profile_key, u64, CA_PROFILE_COUNTS);
BPF_HASH(profile_counts1, struct profile_key, u64, CA_PROFILE_COUNTS);
BPF_ARRAY(profile_active, u32, 1);
BPF_HASH(profile_pids, u32, u8, 65536);
BPF_PERCPU_ARRAY(profile_dropped, u64, 1); /* a count map was full */

BPF_HASH(py_procs, u32, struct py_proc, 4096);             /* tgid -> offsets; user space writes */
BPF_HASH(py_stacks, u64, struct py_stack, CA_PROFILE_STACKS); /* user space deletes after a drain */
/* (pid, code object) -> its name, file, line. LRU: a code object freed and its entry evicted
 * before a drain reads it shows as an unknown Python frame. */
BPF_TABLE("lru_hash", struct py_symbol_key, struct py_symbol, py_symbols, CA_PY_SYMBOLS);
BPF_PERCPU_ARRAY(py_scratch, struct py_scratch, 1);

/* A str's text, read as compact ASCII or compact non-ASCII by its state's `ascii` bit, with no
 * branch (each one multiplies the verifier's paths by the frames walked); returns the state,
 * which user space checks (compact, one byte per character) before it trusts the text. */
static __always_inline u8 py_read_str(struct py_proc *pp, u64 str, char *dst, u32 size) {
    u32 state = 0;
    bpf_probe_read_user(&state, sizeof(state), (void *)(str + pp->str_state));
    u64 ascii = (state >> 6) & 1;
    u64 data = str + pp->str_compact - ascii * (u64)(pp->str_compact - pp->str_ascii);
    bpf_probe_read_user_str(dst, size, (void *)data);
    return state;
}

/* A code object's name, file and line into py_symbols, unless there already. */
static __always_inline void py_symbolize(struct py_proc *pp, struct py_symbol_key *sk, struct py_symbol *sym) {
    if (py_symbols.lookup(sk))
        return;
    u64 code = sk->code;
    sym->line = 0;
    bpf_probe_read_user(&sym->line, sizeof(sym->line), (void *)(code + pp->code_line));
    bpf_probe_read_user(&sym->name_ptr, sizeof(sym->name_ptr), (void *)(code + pp->code_name));
    bpf_probe_read_user(&sym->file_ptr, sizeof(sym->file_ptr), (void *)(code + pp->code_file));
    sym->name_state = py_read_str(pp, sym->name_ptr, sym->name, sizeof(sym->name));
    sym->file_state = py_read_str(pp, sym->file_ptr, sym->file, sizeof(sym->file));
    py_symbols.insert(sk, sym);
}

/* The sampled thread's Python stack into s->stack; returns its hash (0: none). */
static __always_inline u64 py_walk(struct py_proc *pp, u32 pid, struct py_scratch *s) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct bpf_pidns_info ns = {};
    if (pp->pidns_ino && bpf_get_ns_current_pid_tgid(pp->pidns_dev, pp->pidns_ino, &ns, sizeof(ns)) == 0)
        tid = ns.pid;
    u64 interp = 0, ts = 0;
    bpf_probe_read_user(&interp, sizeof(interp), (void *)(pp->runtime + pp->interp_head));
    if (!interp)
        return 0;
    bpf_probe_read_user(&ts, sizeof(ts), (void *)(interp + pp->threads_head));
    u64 found = 0;
    for (int i = 0; i < CA_PY_THREADS && ts; i++) {
        u64 native = 0;
        bpf_probe_read_user(&native, sizeof(native), (void *)(ts + pp->tstate_native_tid));
        if (native == tid) {
            found = ts;
            break;
        }
        bpf_probe_read_user(&ts, sizeof(ts), (void *)(ts + pp->tstate_next));
    }
    if (!found)
        return 0;
    u64 frame = 0, holder = found;
    if (pp->tstate_cframe != 0xffff)
        bpf_probe_read_user(&holder, sizeof(holder), (void *)(found + pp->tstate_cframe));
    if (!holder)
        return 0;
    bpf_probe_read_user(&frame, sizeof(frame), (void *)(holder + pp->cframe_frame));
    /* First the frames' code objects (a loop the verifier walks cheaply), then their symbols. */
    u64 hash = 14695981039346656037ULL;
    u32 depth = 0;
    for (int i = 0; i < CA_PY_DEPTH; i++) {
        if (!frame)
            break;
        u64 code = 0;
        bpf_probe_read_user(&code, sizeof(code), (void *)(frame + pp->frame_code));
        s->stack.code[i] = code;
        hash = (hash ^ code) * 1099511628211ULL;
        depth = i + 1;
        bpf_probe_read_user(&frame, sizeof(frame), (void *)(frame + pp->frame_previous));
    }
    s->key.pid = pid;
    s->key._pad = 0;
    for (int i = 0; i < CA_PY_DEPTH; i++) {
        if (i >= depth)
            break;
        s->key.code = s->stack.code[i];
        if (s->key.code)
            py_symbolize(pp, &s->key, &s->sym);
    }
    s->stack.depth = depth;
    s->stack.truncated = frame != 0;
    if (!depth)
        return 0;
    hash = (hash ^ depth) * 1099511628211ULL;
    if (!hash)
        hash = 1;
    py_stacks.insert(&hash, &s->stack); /* present already: the same frames */
    return hash;
}

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
    struct py_proc *pp = py_procs.lookup(&pid);
    if (pp) {
        int z = 0;
        struct py_scratch *s = py_scratch.lookup(&z);
        if (s)
            key.py_stack = py_walk(pp, pid, s);
    }
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
