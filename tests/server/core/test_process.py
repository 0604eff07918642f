"""The engine core process's transport and messages (server/core/process.py, messages.py)."""

import threading
import time

import msgspec
import pytest
import zmq

from server.core.messages import Admit, Events, ToCore, ToFrontEnd
from server.core.process import Outbox, sockets
from server.runtime.sampling import SamplingParams

# More messages than ZeroMQ's default high-water mark (1000) holds, each 32 KiB: with
# bounded queues, both sides' sends would block here with nobody reading.
MESSAGES, SIZE = 3000, 32 * 1024


def test_full_pipes_in_both_directions_block_no_sender(tmp_path):
    """Both sides send everything before either reads (a front end busy in a burst, a core
    busy in a step): no send blocks, and every message arrives once, in order."""
    ctx = zmq.Context()
    a_to_b, b_to_a = f"ipc://{tmp_path}/a", f"ipc://{tmp_path}/b"
    front_pull, front_push = sockets(ctx, True, b_to_a, a_to_b)
    core_pull, core_push = sockets(ctx, False, a_to_b, b_to_a)
    payload = b"x" * SIZE

    def send_all(sock, tag):
        for i in range(MESSAGES):
            sock.send(tag + i.to_bytes(4, "big") + payload)

    senders = [threading.Thread(target=send_all, args=(front_push, b"F")),
               threading.Thread(target=send_all, args=(core_push, b"C"))]
    for s in senders:
        s.start()
    for s in senders:
        s.join(60)
        assert not s.is_alive(), "a send blocked on a full pipe"
    for sock, tag in ((core_pull, b"F"), (front_pull, b"C")):
        got = [sock.recv() for _ in range(MESSAGES)]
        assert [m[:5] for m in got] == [tag + i.to_bytes(4, "big") for i in range(MESSAGES)]
        assert all(len(m) == 5 + SIZE for m in got)
    for sock in (front_pull, front_push, core_pull, core_push):
        sock.close(linger=0)
    ctx.term()


def test_the_outbox_keeps_order_and_never_waits_to_put():
    box = Outbox()
    for i in range(10_000):
        box.put(i)
    assert box.take() == list(range(10_000))
    assert box.take(timeout_s=0.01) == []


def test_flush_waits_until_the_output_thread_sent_everything_and_is_bounded():
    """The engine thread flushes before the step after a first token (a compiled step holds
    the GIL, so the output thread, a Python thread, could send that token only after it)."""
    box = Outbox()
    assert box.flush(0.0)  # nothing put: nothing to wait for
    box.put("a")
    start = time.perf_counter()
    assert not box.flush(0.05)  # nobody sends: it gives up at its bound
    assert 0.04 < time.perf_counter() - start < 1.0
    sent = []

    def output_thread():  # as Core._send_loop: take, send, say so
        while len(sent) < 3:
            items = box.take(timeout_s=1.0)
            time.sleep(0.02)  # the send
            sent.extend(items)
            box.sent(len(items))

    thread = threading.Thread(target=output_thread)
    thread.start()
    box.put("b")
    box.put("c")
    assert box.flush(5.0)  # the Python thread ran meanwhile: the wait released the GIL
    assert sent == ["a", "b", "c"]
    thread.join(5)


def test_messages_round_trip_and_a_wrong_one_is_an_error():
    msg = Admit(3, [1, 2, 3], 8, SamplingParams(temperature=0.5, seed=7), [2], 12.5, None)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=ToCore) == msg
    ev = Events([(3, 17, 4, 1.5)], [(3, 1.25)], [(3, "length", "", 5, 2.0)], [("set_queue", [1, 0, 1])], {"running": 1})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ev), type=ToFrontEnd) == ev
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"type": "Admit", "rid": "three"}), type=ToCore)
