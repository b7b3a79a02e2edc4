# CPU image for `imgclf serve` on an ONNX export folder. No torch: onnxruntime does inference,
# and the serving code path imports nothing that imports torch.
#
# 1. Export a run (on a machine with the full environment):
#      imgclf export runs/<run-id> --format onnx          # → runs/<run-id>/export/
# 2. Build, from the repository root (EXPORT must lie inside the build context; .dockerignore
#    keeps runs/*/export/ and drops the rest of runs/):
#      docker build --build-arg EXPORT=runs/<run-id>/export -t imgclf-serve .
# 3. Run. Inside the container the server binds 0.0.0.0; publish it on the host's loopback
#    unless it really should be reachable from other machines:
#      docker run --rm -p 127.0.0.1:8000:8000 imgclf-serve
#      curl -F file=@photo.jpg http://127.0.0.1:8000/predict
#    Limits are `imgclf serve` options, e.g.:
#      docker run --rm -p 127.0.0.1:8000:8000 imgclf-serve \
#        imgclf serve /model --host 0.0.0.0 --port 8000 --concurrency 4 --max-bytes 5000000
#
# Every package below is pinned to its constraints.txt version (tests/test_serve.py checks it);
# `-c constraints.txt` pins their own dependencies too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt \
        fastapi==0.165.0 \
        uvicorn==0.54.0 \
        python-multipart==0.0.34 \
        onnxruntime==1.32.0 \
        numpy==2.4.6 \
        pillow==13.0.0 \
        pydantic==2.14.3 \
        typer==0.29.2 \
        rich==15.0.0 \
        PyYAML==6.0.3

# imgclf itself without its training dependencies (torch, timm, lightning, mlflow, …).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . \
    && python -c "import sys, imgclf.cli, imgclf.serve.app; assert 'torch' not in sys.modules" \
    && rm -rf /src

ARG EXPORT=export
COPY ${EXPORT} /model

RUN useradd --system --uid 10001 --no-create-home imgclf
USER imgclf
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["imgclf", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
