"""The TCP transport against a collector that reads slowly: what waits in the process's
write buffer is at most about one message, not every message of a batch (issue 12: a
100k-record poll over TCP held its encoded messages twice, once in the buffer)."""

import asyncio
import socket

from ovsflow.transport import StreamTransport

MESSAGE = b"\0" * 60_000  # close to the largest IPFIX message (65535 bytes)


def test_a_slow_collector_holds_the_sender_back_per_message():
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def scenario():
        transport = StreamTransport("127.0.0.1", server.getsockname()[1])
        await transport.connect()
        transport._writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sending = asyncio.create_task(transport.send([MESSAGE] * 100))  # 6 MB
        buffered = []
        for _ in range(20):  # nobody reads: the send stays blocked
            await asyncio.sleep(0.05)
            buffered.append(transport._writer.transport.get_write_buffer_size())
        done = sending.done()
        sending.cancel()
        await transport.close()
        return done, buffered

    try:
        done, buffered = asyncio.run(scenario())
    finally:
        server.close()
    assert not done
    # asyncio's high-water mark (64 KiB) plus the message that crossed it
    assert 0 < max(buffered) <= 64 * 1024 + len(MESSAGE)
