"""The rpc baseline: a minimal blocking msgpack-rpc echo server on a Unix socket.

`python -m bench.echo PATH`: one connection at a time; every request
[0, msgid, method, params] is answered [1, msgid, None, params[0]]. No event
loop, no dispatch table, no database: what one round trip costs on this machine.
"""

from __future__ import annotations

import os
import socket
import sys

import msgpack


def serve(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        unp = msgpack.Unpacker(raw=False)
        with conn:
            while True:
                data = conn.recv(256 * 1024)
                if not data:
                    break
                unp.feed(data)
                out = []
                for msg in unp:
                    params = msg[3][0] if msg[3] else None
                    out.append(msgpack.packb([1, msg[1], None, params], use_bin_type=True))
                if out:
                    conn.sendall(b"".join(out))


if __name__ == "__main__":
    serve(sys.argv[1])
