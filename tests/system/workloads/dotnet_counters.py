"""A .NET Core 3.1 runtime (PyPI dotnetcore2) hosted in this Python process by pythonnet, for
tests/system/test_dotnet.py. Prints {"pid", "version"} and waits for "go" on stdin; then
allocates ALLOC_ARRAYS byte arrays of ARRAY_BYTES, calls GC.Collect() COLLECTS times, throws
(and catches) EXCEPTIONS FormatExceptions, and prints what the runtime itself says: its gen-2
collections, the bytes it allocated and the first-chance exceptions it raised meanwhile (a
handler subscribed before the start: the runtime's exception-count counts first-chance
exceptions, and a .NET exception thrown into Python through pythonnet's reflection call is two
of them).

A `dotnet app.dll` starts the runtime's System.Runtime counters (RuntimeEventSource) before
Main; a runtime hosted through hostfxr with no Main does not, so this calls the same internal
RuntimeEventSource.Initialize() the startup path calls (no compiler here to build an app.dll)."""

import json
import os
import sys

import dotnetcore2

root = os.path.join(os.path.dirname(dotnetcore2.__file__), "bin")
os.environ["DOTNET_ROOT"] = root
os.environ.setdefault("DOTNET_SYSTEM_GLOBALIZATION_INVARIANT", "1")  # no libicu needed

from pythonnet import load  # noqa: E402

load("coreclr")
import clr  # noqa: E402,F401
import System  # noqa: E402
from System import GC, AppDomain, Environment  # noqa: E402
from System.Reflection import BindingFlags  # noqa: E402

res = System.Type.GetType("System.Diagnostics.Tracing.RuntimeEventSource, System.Private.CoreLib")
res.GetMethod("Initialize", BindingFlags.NonPublic | BindingFlags.Public | BindingFlags.Static).Invoke(None, None)

# what System.Runtime's exception-count reads: the exceptions the runtime raised since it started
exception_count = System.Type.GetType("System.Exception, System.Private.CoreLib").GetMethod(
    "GetExceptionCount", BindingFlags.NonPublic | BindingFlags.Static)
ALLOC_ARRAYS, ARRAY_BYTES, COLLECTS, EXCEPTIONS = (int(a) for a in sys.argv[1:5])
seen = [0]


def first_chance(_sender: object, _args: object) -> None:
    seen[0] += 1


AppDomain.CurrentDomain.FirstChanceException += first_chance
try:  # a first throw before the session: pythonnet's first call of the handler throws (and catches)
    System.Int32.Parse("warm-up")  # two exceptions of its own, unseen by the handler (it is running)
except System.FormatException:
    pass
print(json.dumps({"pid": os.getpid(), "version": str(Environment.Version)}), flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
seen_before = seen[0]
gen2_before = GC.CollectionCount(2)
alloc_before = GC.GetTotalAllocatedBytes(False)
keep = []
for _ in range(ALLOC_ARRAYS):
    keep.append(System.Array.CreateInstance(System.Byte, ARRAY_BYTES))
    if len(keep) > 4:
        keep.pop(0)
for _ in range(COLLECTS):
    GC.Collect()
thrown = 0
for _ in range(EXCEPTIONS):
    try:
        System.Int32.Parse("not a number")
    except System.FormatException:
        thrown += 1
print(json.dumps({"gen2": GC.CollectionCount(2) - gen2_before, "allocated": GC.GetTotalAllocatedBytes(False) - alloc_before,
                  "thrown": thrown, "first_chance": seen[0] - seen_before, "exceptions_total": int(exception_count.Invoke(None, None))}), flush=True)
sys.stdin.readline()
