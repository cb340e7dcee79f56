"""Python profiler workload, run by Debian's /usr/bin/python3: main -> handler -> burn_alpha /
burn_beta, the same loop with three times the iterations in burn_alpha (3:1 of CPU), in short
rounds of random length, until the process has used SECONDS of CPU time (argv[1]); then prints
its CPU time and waits for a line on stdin."""

import os
import random
import sys
import time


def burn_alpha(n):
    x = 0
    for i in range(n):
        x += i * 7
    return x


def burn_beta(n):
    x = 0
    for i in range(n):
        x += i * 7
    return x


def handler(n):
    return burn_alpha(3 * n) + burn_beta(n)


def main():
    seconds = float(sys.argv[1])
    rnd = random.Random(os.getpid())
    while time.process_time() < seconds:
        handler(rnd.randint(50, 300))
    t = os.times()
    print(t.user + t.system, flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
