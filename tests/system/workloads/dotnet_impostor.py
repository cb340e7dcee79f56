"""A hostile process for tests/system/test_dotnet.py: it maps a file named libcoreclr.so (so the
agent takes it for .NET) and serves /tmp/dotnet-diagnostic-<pid>-1-socket, answering every
connection with MODE: "garbage" (random bytes after a valid-looking header) or "silent" (reads,
never answers). Prints {"pid"} once listening; runs until stdin closes."""

import json
import mmap
import os
import socket
import sys
import tempfile
import threading

mode = sys.argv[1]
d = tempfile.mkdtemp()
lib = os.path.join(d, "libcoreclr.so")
with open(lib, "wb") as f:
    f.write(b"\0" * 4096)
with open(lib, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
path = f"/tmp/dotnet-diagnostic-{os.getpid()}-1-socket"
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
os.chmod(path, 0o777)  # the agent keeps no CAP_DAC_OVERRIDE: another user's 0600 socket is closed to it
srv.listen(16)


def serve() -> None:
    while True:
        c, _ = srv.accept()
        c.recv(4096)
        if mode == "garbage":
            c.sendall(b"DOTNET_IPC_V1\0" + bytes([28, 0, 0xFF, 0, 0, 0]) + os.urandom(8) + os.urandom(4096))
            c.close()
        # silent: keep the connection, never answer


threading.Thread(target=serve, daemon=True).start()
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()
os.unlink(path)
