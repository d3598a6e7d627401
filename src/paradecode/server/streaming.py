"""Running a decode on a thread of its own for an async HTTP handler, and stopping it when the client leaves.

The server decodes one request at a time (a lock), so a decode nobody waits for any more would hold the
CPU and every queued request behind it: each request carries a ``threading.Event`` the decode asks after
every model call (``generate(..., cancel=event.is_set)``), set when the client disconnects.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Callable

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


async def started(events: AsyncIterator[tuple[str, Any]]) -> tuple[tuple[str, Any], AsyncIterator[tuple[str, Any]]]:
    """The first event of :func:`stream_decode` and the events after it. A server awaits it before its
    response starts, so a request the method refuses only once it sees the model (jacobi asked to sample, a
    layer the model lacks) gets an error status, not a 200 stream carrying an error."""
    first = await anext(events)
    if first[0] == "error":
        await events.aclose()
    return first, events


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
