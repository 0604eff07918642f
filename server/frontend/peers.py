"""Was a cut stream cancelled by a client that is still connected, or did the client's
connection go away? gRPC tells a server handler only that its call was cancelled; the
one place the difference shows is the transport: after a plain cancel the client's
HTTP/2 connection is still open, after a disconnect (channel closed, process killed,
socket reset) it is gone a moment later. grpc core's channelz lists the server's open
connections by peer address; grpcio reaches it only through its private `cygrpc`
module, so this is best effort: if that API is missing, every cut counts as cancelled.

Known limits: a client that cancels and then closes its channel at once counts as
disconnected; a peer that vanishes silently counts as cancelled until keepalive notices;
and a grpcio client's `channel.close()` may leave its TCP connection open (subchannels
are shared across channels to the same target), so that counts as cancelled too.
"""

from __future__ import annotations

import json

SETTLE_S = 0.2  # after the cancel, before the transport is looked at: a closing socket is gone by then


def connection_open(peer: str) -> bool | None:
    """Whether the server still holds an HTTP/2 connection to `peer` (context.peer(),
    e.g. "ipv4:127.0.0.1:53412"); None when channelz cannot say."""
    try:
        from grpc._cython import cygrpc

        want = f"chttp2 {peer}"
        for server in json.loads(cygrpc.channelz_get_servers(0)).get("server", []):
            server_id, start = int(server["ref"]["serverId"]), 0
            while True:  # paged: up to 100 sockets a page
                page = json.loads(cygrpc.channelz_get_server_sockets(server_id, start, 0))
                refs = page.get("socketRef", [])
                if any(ref.get("name") == want for ref in refs):
                    return True
                if page.get("end", True) or not refs:
                    break
                start = max(int(ref["socketId"]) for ref in refs) + 1
        return False
    except Exception:  # a grpcio without this private API, or a format change
        return None
