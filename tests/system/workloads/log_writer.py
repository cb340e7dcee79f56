"""Writes log lines for the system tests. Commands on stdin, one per line:
    open PATH            open PATH for appending (O_APPEND), as an application does
    write TEXT           one line
    lines N FORMAT       N lines, FORMAT with {i}
    raw TEXT             TEXT as is (\\n escapes allowed), no newline added
    exit
Each command answers 'ok' when done."""

import sys

f = None
for cmd in sys.stdin:
    word, _, arg = cmd.rstrip("\n").partition(" ")
    if word == "open":
        if f:
            f.close()
        f = open(arg, "a", buffering=1)
    elif word == "write":
        f.write(arg + "\n")
    elif word == "lines":
        n, _, fmt = arg.partition(" ")
        for i in range(int(n)):
            f.write(fmt.format(i=i) + "\n")
    elif word == "raw":
        f.write(arg.encode().decode("unicode_escape"))
    elif word == "exit":
        break
    f and f.flush()
    print("ok", flush=True)
