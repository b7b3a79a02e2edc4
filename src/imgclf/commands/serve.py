"""`imgclf serve`: the HTTP API and upload page for a run folder or an ONNX export folder.

The option defaults repeat `imgclf.serve.limits.Limits` (a test keeps them equal) so that this
module imports nothing but typer and rich."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

DEFAULT_HOST = "127.0.0.1"  # loopback unless the user asks for more (docs/RELIABILITY.md H7)
console = Console()


def serve(
    model: Annotated[Path, typer.Argument(help="export folder (model.onnx) or run folder")],
    host: Annotated[str, typer.Option(help="bind address; 0.0.0.0 exposes it")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    backend: Annotated[
        str, typer.Option(help="auto (onnx when an export is found) | onnx | torch")
    ] = "auto",
    max_bytes: Annotated[int, typer.Option(min=1, help="largest request body (413)")] = 10 * 2**20,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="largest width × height, from the header (422)")
    ] = 50_000_000,
    max_request_pixels: Annotated[
        int,
        typer.Option(
            min=1, help="total width × height of a request's images, from the headers (413)"
        ),
    ] = 200_000_000,
    max_files: Annotated[int, typer.Option(min=1, help="files per /predict/batch request")] = 16,
    max_uploads: Annotated[
        int, typer.Option(min=1, help="request bodies received at once (503)")
    ] = 32,
    concurrency: Annotated[int, typer.Option(min=1, help="inference threads")] = 2,
    queue: Annotated[int, typer.Option(min=0, help="requests waiting beyond those (503)")] = 8,
    timeout: Annotated[float, typer.Option(help="seconds per request once read (504)")] = 30.0,
    read_timeout: Annotated[float, typer.Option(help="seconds for the request body (408)")] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve a model over HTTP: POST /predict, /predict/batch, GET /health, /model, /docs, /."""
    from imgclf.serve.app import create_app, make_server
    from imgclf.serve.backend import default_threads, open_backend
    from imgclf.serve.limits import Limits

    limits = Limits(
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_request_pixels=max_request_pixels,
        max_files=max_files,
        max_uploads=max_uploads,
        concurrency=concurrency,
        queue=queue,
        timeout=timeout,
        read_timeout=read_timeout,
    )
    served = open_backend(model, backend, threads=default_threads(concurrency))
    console.print(
        f"serving {served.name} ({served.kind}, {len(served.labels)} classes, "
        f"id {served.model_id}) on http://{host}:{port}/",
        highlight=False,
        soft_wrap=True,
    )
    make_server(create_app(served, limits), host, port, limits, log_level).run()


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("serve")(serve)
