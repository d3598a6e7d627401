"""Running a decode on a thread of its own for an async HTTP handler, and stopping it when the client leaves.

The server decodes one request at a time (a lock), so a decode nobody waits for any more would hold the
CPU and every queued request behind it: each request carries a ``threading.Event`` the decode asks after
every model call (``generate(..., cancel=event.is_set)``), set when the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ..errors import UserError

POLL = 0.25     # seconds between checks that a non-streaming request's client is still there


async def stream_decode(run: Callable[[Callable[[str], None]], Any],
                        cancel: threading.Event) -> AsyncIterator[tuple[str, Any]]:
    """Run ``run(on_text)`` on a thread; yield ``("text", piece)`` as the decode streams, then ``("done",
    result)`` or ``("error", error body)``. A failure reaches the client and the server keeps serving. When
    the consumer stops early (the client disconnected, so the response is cancelled), ``cancel`` is set."""
    pieces: queue.Queue = queue.Queue()

    def work():
        try:
            pieces.put(("done", run(lambda piece: pieces.put(("text", piece)))))
        except UserError as e:
            pieces.put(("error", {"type": "invalid_request", "message": e.problem, "fix": e.fix, "field": e.field}))
        except Exception as e:
            pieces.put(("error", {"type": "internal_error", "message": f"{type(e).__name__}: {e}"}))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            kind, data = await asyncio.to_thread(pieces.get)
            yield kind, data
            if kind in ("done", "error"):
                return
    finally:
        cancel.set()        # a decode still running stops after its current model call


async def first_event(request, run: Callable[[Callable[[str], None]], Any], cancel: threading.Event):
    """Start ``run`` as :func:`stream_decode` does and wait for its first event (a piece, the end, or an error)
    while watching the client: ``(first, events)``, the events after it as one async iterator that closes
    itself. A server waits for it before its response starts, so a request the method refuses only once it
    sees the model (jacobi asked to sample, a layer the model lacks) gets an error status rather than a 200
    stream carrying an error, and a client that leaves while its request queues stops it (``cancel``)."""
    events = stream_decode(run, cancel)

    async def first():
        return await anext(events)

    task = asyncio.ensure_future(first())
    while not (await asyncio.wait({task}, timeout=POLL))[0]:
        if not cancel.is_set() and await request.is_disconnected():
            cancel.set()
    head = task.result()
    if head[0] in ("done", "error"):
        await events.aclose()
    return head, _closing(events)


async def _closing(events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[tuple[str, Any]]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield event


class EventStream(StreamingResponse):
    """A stream of server-sent events whose decode stops however the response ends: finished, failed, or
    cancelled by a client that left before its body even started."""

    def __init__(self, body, cancel: threading.Event):
        super().__init__(body, media_type="text/event-stream")
        self.cancel = cancel

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


async def run_unless_disconnected(request, run: Callable[[], Any], cancel: threading.Event):
    """``run()`` on a thread, its result; ``cancel`` is set if the client disconnects meanwhile (the result
    then goes nowhere, and the decode stops after its current model call)."""
    task = asyncio.ensure_future(asyncio.to_thread(run))
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL)
        if done:
            return task.result()
        if not cancel.is_set() and await request.is_disconnected():
            cancel.set()
