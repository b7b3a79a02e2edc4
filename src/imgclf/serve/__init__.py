"""The HTTP server: `imgclf serve RUN|EXPORT` (FastAPI + uvicorn, onnxruntime or torch backend).

`create_app(backend, limits)` builds the ASGI app; `open_backend(path)` picks the backend;
`make_server` wraps uvicorn with the header deadline. Importing this package imports no torch.
"""
