"""What the server refuses, and how early (docs/RELIABILITY.md H1-H10).

Uploads are untrusted. The body is counted while it streams in and refused at the size cap
(Content-Length is checked before a single body byte is read); it is parsed in memory and never
written to disk, so a client's file name is never a path; the content, not the declared type,
decides whether it is an image; a slow client is cut off by a header and a body deadline. Bodies
being received are counted on their own (`Uploads`, 503 beyond --max-uploads): a request enters
the admission gate only once its body is read and sniffed, so idle slow uploads never hold an
inference slot (H8). The gate answers 503 + Retry-After instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from uvicorn.protocols.http.h11_impl import H11Protocol

from imgclf.data.images import sniff_format

# What the server decodes; anything else is 415 whatever the client's Content-Type says.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
SNIFF_BYTES = 512


@dataclass(frozen=True)
class Limits:
    """Every bound the server applies (`imgclf serve` options, except min_side and
    header_timeout)."""

    max_bytes: int = 10 * 2**20  # one request body (413 above)
    max_pixels: int = 50_000_000  # width × height from the header (422 above, before decoding)
    min_side: int = 8
    max_files: int = 16  # per /predict/batch request
    concurrency: int = 2  # inference threads
    queue: int = 8  # admitted requests waiting for a thread (503 beyond)
    timeout: float = 30.0  # once the body is read: 503 if still queued, 504 if still running
    read_timeout: float = 30.0  # the whole body must arrive within this (408)
    max_uploads: int = 32  # bodies being received at once (503 beyond), apart from inference
    max_request_pixels: int = 200_000_000  # Σ width × height of one request's images (413)
    header_timeout: float = 10.0  # the request line and headers must arrive within this


# Decoded in one request, past this the freed heap is handed back to the system.
TRIM_AFTER_PIXELS = 16_000_000


class HTTPProblem(Exception):
    """An answer for the client: status, a short error name and a detail."""

    def __init__(
        self, status: int, error: str, detail: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail
        self.headers = headers or {}


def too_large(limit: int) -> HTTPProblem:
    """413 naming the limit; the connection is closed so the rest of the body is never read."""
    detail = f"the request body is larger than {limit:,} bytes (--max-bytes)"
    return HTTPProblem(413, "payload too large", detail, {"Connection": "close"})


def check_image_bytes(data: bytes) -> str:
    """The sniffed format of an upload; 415 when it is not one the server decodes."""
    if not data:
        raise HTTPProblem(422, "empty file", "the upload has no bytes")
    fmt = sniff_format(data[:SNIFF_BYTES])
    if fmt not in ACCEPTED_FORMATS:
        what = f"content is {fmt}" if fmt else "content is not a recognised image"
        accepted = ", ".join(ACCEPTED_FORMATS)
        raise HTTPProblem(415, "unsupported media type", f"{what}; accepted: {accepted}")
    return fmt


def release_freed_memory() -> None:
    """Hand the heap memory freed by big decodes back to the system (glibc's malloc_trim).

    glibc keeps freed blocks in its heaps for reuse, so without this the server's resident
    size stays at its peak after one request with large images (H9: memory returns).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def check_request_pixels(pixels: list[int], limits: Limits) -> None:
    """413 when one request's images together declare more than --max-request-pixels (H9)."""
    total = sum(pixels)
    if total > limits.max_request_pixels:
        detail = (
            f"the {len(pixels)} image(s) of this request declare {total:,} pixels in all, "
            f"limit {limits.max_request_pixels:,} per request (--max-request-pixels)"
        )
        raise HTTPProblem(413, "too many pixels", detail)


class BodyLimit:
    """Pure ASGI middleware: 413 on a large Content-Length before reading, or as soon as a
    streamed (chunked) body passes the cap; nothing downstream ever sees more bytes."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_problem(send, too_large(self.max_bytes))
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large(self.max_bytes)
            return message

        await self.app(scope, counted, send)


async def send_problem(send: Callable, problem: HTTPProblem) -> None:
    """Answer with the JSON error body at the ASGI level (before any framework code runs)."""
    body = json.dumps({"error": problem.error, "detail": problem.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(stream: AsyncIterator[bytes], deadline_s: float) -> bytes:
    """The whole body (BodyLimit caps its size) within a deadline; 408 for a slow sender."""

    async def collect() -> bytes:
        chunks = bytearray()
        async for chunk in stream:
            chunks += chunk
        return bytes(chunks)

    try:
        return await asyncio.wait_for(collect(), deadline_s)
    except asyncio.TimeoutError:
        detail = f"the body did not arrive within {deadline_s:g} s (--read-timeout)"
        raise HTTPProblem(408, "request timeout", detail, {"Connection": "close"}) from None


class Uploads:
    """Request bodies being received at once (≤ ``limit``, else 503 at once).

    Counted apart from the admission gate: a client that opens an upload and goes quiet holds
    one of these (until --read-timeout, 408), never an inference slot, so ``limit`` idle clients
    only stop other uploads, and the memory held by bodies in transit is at most
    ``limit × max_bytes``.
    """

    def __init__(self, limit: int, read_timeout: float) -> None:
        self.limit, self.read_timeout = limit, read_timeout
        self.active = 0  # only touched on the event loop: no lock needed

    async def read(self, stream: AsyncIterator[bytes]) -> bytes:
        """The whole body within --read-timeout (408), or 503 when ``limit`` are being read."""
        if self.active >= self.limit:
            detail = f"{self.active} request bodies are being received (--max-uploads)"
            # Close: the body of this request is never read, so the connection cannot be reused.
            raise HTTPProblem(503, "busy", detail, {"Retry-After": "1", "Connection": "close"})
        self.active += 1
        try:
            return await read_body(stream, self.read_timeout)
        finally:
            self.active -= 1


@dataclass
class Part:
    """One multipart part, in memory; ``filename`` is what the client said, never a path."""

    name: str
    filename: str | None
    content_type: str
    data: bytearray


def parse_multipart(
    body: bytes, content_type: str, max_files: int, max_fields: int = 8
) -> list[Part]:
    """multipart/form-data → parts, all in memory (never spooled to a temporary file)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPProblem(400, "bad request", "multipart body without a boundary")
    parts: list[Part] = []
    field, value, headers = bytearray(), bytearray(), {}
    counted = {True: 0, False: 0}  # file parts, plain fields

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_headers_finished() -> None:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        counted[filename is not None] += 1
        if counted[True] > max_files:
            raise HTTPProblem(413, "too many files", f"at most {max_files} per request")
        if counted[False] > max_fields:
            raise HTTPProblem(413, "too many fields", f"at most {max_fields} form fields")
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        parts.append(
            Part(name, filename and filename.decode("utf-8", "replace"), ctype, bytearray())
        )
        headers.clear()

    callbacks = {
        "on_header_field": lambda d, s, e: field.extend(d[s:e]),
        "on_header_value": lambda d, s, e: value.extend(d[s:e]),
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": lambda d, s, e: parts[-1].data.extend(d[s:e]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except HTTPProblem:
        raise
    except Exception as e:  # python-multipart raises its own errors for malformed bodies
        raise HTTPProblem(400, "bad request", f"malformed multipart body: {e}") from None
    return parts


class Gate:
    """Admission (running + queued ≤ concurrency + queue, else 503) in front of a fixed pool.

    A thread slot is given back only when the inference really ends, so an inference that
    outlives its timeout keeps its slot: the pool never grows past ``concurrency`` threads.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency, self.capacity = concurrency, concurrency + queue
        self.admitted = 0
        self.running = 0
        self._slots: asyncio.Semaphore | None = None
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="imgclf-infer")
        self._mean_s = 0.05  # running mean of inference time, for Retry-After

    def retry_after(self) -> int:
        """Seconds until a slot is likely free (whole seconds, at least 1)."""
        return max(1, math.ceil(self._mean_s * self.capacity / self.concurrency))

    def busy(self, detail: str) -> HTTPProblem:
        """503 with Retry-After."""
        return HTTPProblem(503, "busy", detail, {"Retry-After": str(self.retry_after())})

    def admit(self) -> None:
        """Take an admission ticket or raise 503 at once."""
        if self.admitted >= self.capacity:
            raise self.busy(f"{self.admitted} requests in progress (--concurrency + --queue)")
        self.admitted += 1

    def leave(self) -> None:
        """Give the admission ticket back."""
        self.admitted -= 1

    async def run(self, fn: Callable[[], Any], deadline: float) -> Any:
        """Run ``fn`` on a pool thread by the monotonic ``deadline`` (503 queued, 504 running)."""
        loop = asyncio.get_running_loop()
        if self._slots is None:  # created here so it belongs to the server's event loop
            self._slots = asyncio.Semaphore(self.concurrency)
        if not await _acquire_within(self._slots, deadline - time.monotonic()):
            raise self.busy("no inference thread became free in time (--timeout)")
        self.running += 1
        start = time.monotonic()
        future = loop.run_in_executor(self._pool, fn)
        future.add_done_callback(lambda _: self._finished(start))
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline - time.monotonic())
        except asyncio.TimeoutError:
            detail = "inference did not finish in time (--timeout); the request was abandoned"
            raise HTTPProblem(504, "inference timeout", detail) from None

    def _finished(self, start: float) -> None:
        self.running -= 1
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - start)
        self._slots.release()

    def stats(self) -> dict[str, int]:
        """Numbers for /health."""
        return {"running": self.running, "admitted": self.admitted, "capacity": self.capacity}

    def close(self) -> None:
        """Stop the pool without waiting for an inference that hangs."""
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _acquire_within(semaphore: asyncio.Semaphore, seconds: float) -> bool:
    """Acquire within ``seconds``; never loses a permit that arrives as the time runs out."""
    if not semaphore.locked():  # a free slot: take it without a waiter task
        return await semaphore.acquire()
    waiter = asyncio.ensure_future(semaphore.acquire())
    await asyncio.wait({waiter}, timeout=max(0.0, seconds))
    return not waiter.cancel()  # cancel() fails only on a finished task: the permit is ours


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's line and headers.

    uvicorn times out idle keep-alive connections but not a client that sends its headers a byte
    at a time (slowloris); this closes such a connection after ``header_timeout`` seconds.
    """

    header_timeout = 10.0  # set per server by `protocol_with_header_timeout`

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a new request's headers are complete
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        self._arm_header_deadline()  # the next request on this connection gets its own
        super().on_response_complete()

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_task = self.loop.call_later(self.header_timeout, self._header_expired)

    def _disarm_header_deadline(self) -> None:
        task = getattr(self, "_header_task", None)
        if task is not None:
            task.cancel()
        self._header_task = None

    def _header_expired(self) -> None:
        self._header_task = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[H11Protocol]:
    """An H11Protocol class whose header deadline is ``seconds``."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": seconds})
