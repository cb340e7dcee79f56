/* CPython frames for the CPU profiler (bpf/profiler.c): the thread's interpreter frames read in
 * the kernel at the sample, leaf first, as code-object addresses; each code object's qualified
 * name, file and first line read once into py_symbols.
 *
 * Offsets come per process from user space (agent/profiling/python.py finds _PyRuntime and the
 * version in the interpreter's symbols and fills struct py_proc), so processes of different
 * Python versions are walked side by side. The walk: _PyRuntime.interpreters.head -> the
 * interpreter's thread list (the thread whose native_thread_id is the sampled thread's id in
 * the process's pid namespace, at most CA_PY_THREADS looked at) -> cframe -> current_frame ->
 * previous ..., at most CA_PY_DEPTH frames. Strings: the compact ASCII or Latin-1 text of a
 * str, at most CA_PY_NAME / CA_PY_FILE bytes. Every read is a bpf_probe_read_user: a process
 * whose memory does not match (a torn list mid-update, a freed frame) gives a short stack or
 * none, never a fault. */
#ifndef COROOT_AGENT_PYFRAMES_H
#define COROOT_AGENT_PYFRAMES_H

#ifndef CA_PY_DEPTH
#define CA_PY_DEPTH 64 /* a power of two: the index is masked */
#endif
#define CA_PY_THREADS 16
#define CA_PY_NAME 64
#define CA_PY_FILE 128
#define CA_PY_SYMBOLS 16384

struct py_proc {
    u64 runtime;         /* address of _PyRuntime in the process */
    u64 pidns_dev;       /* the process's pid namespace, for its own thread ids */
    u64 pidns_ino;
    u16 interp_head;     /* _PyRuntime.interpreters.head */
    u16 threads_head;    /* PyInterpreterState.threads.head */
    u16 tstate_next;
    u16 tstate_native_tid;
    u16 tstate_cframe;   /* 0xffff: the frame hangs off the thread state directly (3.13) */
    u16 cframe_frame;    /* _PyCFrame.current_frame (or PyThreadState.current_frame) */
    u16 frame_code;      /* _PyInterpreterFrame.f_code / f_executable */
    u16 frame_previous;
    u16 code_name;       /* co_qualname */
    u16 code_file;
    u16 code_line;       /* co_firstlineno */
    u16 str_state;       /* PyASCIIObject.state */
    u16 str_ascii;       /* data of a compact ASCII str (sizeof PyASCIIObject) */
    u16 str_compact;     /* data of a compact non-ASCII str (sizeof PyCompactUnicodeObject) */
    u16 frame_owner;     /* _PyInterpreterFrame.owner (3.13); 0: none. Entry frames give code 0 */
    u16 _pad;
};

struct py_stack {
    u32 depth;
    u32 truncated;       /* deeper than CA_PY_DEPTH: the outermost frames are missing */
    u64 code[CA_PY_DEPTH];
};

struct py_symbol_key {
    u32 pid;
    u32 _pad;
    u64 code;
};

struct py_symbol {
    s32 line;
    u8 name_state;       /* the str's PyASCIIObject.state byte: user space checks it */
    u8 file_state;
    u16 _pad;
    u64 name_ptr;        /* the str objects read (scratch) */
    u64 file_ptr;
    char name[CA_PY_NAME];
    char file[CA_PY_FILE];
};

struct py_scratch {
    struct py_symbol_key key;
    struct py_stack stack;
    struct py_symbol sym;
};

#endif
