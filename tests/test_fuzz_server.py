"""Fuzzing the HTTP API in-process (docs/RELIABILITY.md H1-H10): whatever arrives — random JSON
structures, huge, infinite and NaN numbers, deep nesting, odd encodings, random or damaged image
bytes, odd names and content types — the answer is a 2xx or a 4xx with a JSON error body, never
a 5xx, and the server keeps answering.

The app runs in-process under Starlette's TestClient (the same app `imgclf serve` runs behind
uvicorn), with a bounded number of examples so the file takes seconds, not minutes.
"""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgclf.serve.app import create_app
from imgclf.serve.backend import OnnxBackend
from imgclf.serve.limits import Limits
from test_serve import shared_model

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the test's working folder
    # The autouse cache/working-folder fixture is function-scoped; it holds nothing per example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Damaged TIFFs make Pillow warn about their tags on the way to a 422.
pytestmark = pytest.mark.filterwarnings("ignore:.*(EXIF|Tag|tag).*:UserWarning")
LIMITS = Limits(max_bytes=2**20, max_pixels=4_000_000, max_request_pixels=8_000_000, max_files=4)


def _encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [
    _encoded("PNG"),
    _encoded("JPEG"),
    _encoded("GIF", "P"),
    _encoded("BMP"),
    _encoded("TIFF"),
    _encoded("WEBP"),
    _encoded("PNG", "LA"),
    _encoded("PNG", "I;16"),
]
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM"]
MAGIC += [b"RIFF\x00\x00\x00\x00WEBP", b"%PDF-", b"PK\x03\x04", b"<svg", b"\x00\x00\x01\x00"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A TestClient on the app serving the serve tests' tiny model (its ONNX export)."""
    root = shared_model(tmp_path_factory)
    backend = OnnxBackend((root / "run").resolve() / "export")
    with TestClient(create_app(backend, LIMITS), raise_server_exceptions=False) as c:
        yield c


def assert_answered(r) -> None:
    """2xx, or 4xx with {"error", "detail"}; never a 5xx."""
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics: what the examples reached
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "detail"}, body
        assert isinstance(body["error"], str) and body["error"], body
        assert "Traceback" not in r.text
    else:
        assert r.status_code == 200, r.text[:300]


def assert_alive(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["running"] == 0 and health.json()["admitted"] == 0


# ---------------------------------------------------------------- strategies

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=10**30, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 3, 10**6, 1e400, -1e400, 1e-400, 2.0, 0.5]),
)
# What the H10 repro sent, drawn often rather than left to chance.
hostile = st.sampled_from([math.inf, -math.inf, math.nan, 1e308, 10**4000, True, "2", 1.5, 3.0])
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
damaged_images = st.builds(
    lambda image, flips: _flip(image, flips),
    st.sampled_from(IMAGES),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
)
file_bytes = st.one_of(
    st.sampled_from(IMAGES),
    damaged_images,
    st.sampled_from(IMAGES).map(lambda b: b[: len(b) // 2]),  # truncated
    st.binary(max_size=600),
    st.builds(bytes.__add__, st.sampled_from(MAGIC), st.binary(max_size=300)),
)
valid_image_field = st.one_of(
    file_bytes.map(lambda b: base64.b64encode(b).decode()),
    file_bytes.map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
)
image_field = st.one_of(valid_image_field, st.text(max_size=60), json_values)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-16",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=zz",
        "text/plain",
        "image/png",
        "application/octet-stream",
        "",
        "application/jsonx",
        b"\xff",  # not ASCII: a header value as raw bytes
    ]
)
encodings = st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1", "utf-8-sig"])


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for where, value in flips:
        out[where % len(out)] = value
    return bytes(out)


def _json_text(value) -> str:
    # allow_nan: Python writes NaN / Infinity, which hostile clients send too (H10)
    return json.dumps(value, allow_nan=True)


# ---------------------------------------------------------------- JSON


@FUZZ
@given(
    payload=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"image": valid_image_field, "top_k": st.one_of(hostile, numbers, json_values)},
            optional={"extra": json_values},
        ),
        st.fixed_dictionaries({"image": image_field}),
    ),
    encoding=encodings,
    query=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=12), numbers.map(str)),
)
def test_fuzz_json_predict_is_never_5xx(client, payload, encoding, query):
    """RELIABILITY H10: random JSON documents (any structure, any numbers, any encoding)."""
    try:
        body = _json_text(payload).encode(encoding)
    except UnicodeEncodeError:  # latin-1 cannot hold every character: send UTF-8 then
        body = _json_text(payload).encode()
    params = {} if query is None else {"top_k": query}
    r = client.post(
        "/predict", content=body, headers={"content-type": "application/json"}, params=params
    )
    assert_answered(r)
    assert_alive(client)


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=400),
        st.integers(1, 200_000).map(lambda n: b"[" * n),
        st.integers(1, 100_000).map(lambda n: b'{"a":' * n),
        st.text(max_size=200).map(str.encode),
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b'{"image": 1e400}']),
    ),
    ctype=content_types,
)
def test_fuzz_raw_bodies_and_content_types_are_never_5xx(client, body, ctype):
    """RELIABILITY H2, H10: raw bytes under any content type, to both upload endpoints."""
    for path in ("/predict", "/predict/batch"):
        assert_answered(client.post(path, content=body, headers={"content-type": ctype}))
    assert_alive(client)


# ---------------------------------------------------------------- multipart

names = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["../../x", "..\\..\\x", "/etc/passwd", "C:\\x.png", "a\x00b.png", ""]),
)
parts = st.tuples(
    st.sampled_from(["file", "files", "image", "top_k", "other", ""]),
    st.one_of(st.none(), names),  # None: a plain form field, no filename
    st.sampled_from(["image/png", "image/jpeg", "text/plain", "application/pdf", ""]),
    st.one_of(file_bytes, st.text(max_size=20).map(str.encode), numbers.map(lambda n: b"%r" % n)),
)


def _multipart(items: list, boundary: str) -> bytes:
    out = bytearray()
    for field, filename, ctype, data in items:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode("utf-8", "surrogateescape")
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


@FUZZ
@given(
    items=st.lists(parts, max_size=6),
    boundary=st.sampled_from(["b0undary", "x" * 70, "a b", "----WebKitFormBoundary7MA4YWxk"]),
    path=st.sampled_from(["/predict", "/predict/batch"]),
    top_k=st.one_of(st.none(), st.text(max_size=8), numbers.map(str)),
)
def test_fuzz_multipart_uploads_are_never_5xx(client, items, boundary, path, top_k):
    """RELIABILITY H1-H4, H9: random parts, names, content types and file bytes (valid,
    damaged, truncated, random, sniffable magic + junk) to both upload endpoints."""
    body = _multipart(items, boundary)
    headers = {"content-type": f'multipart/form-data; boundary="{boundary}"'}
    params = {} if top_k is None else {"top_k": top_k}
    r = client.post(path, content=body, headers=headers, params=params)
    assert_answered(r)
    if r.status_code == 200 and path == "/predict/batch":
        for row in r.json()["results"]:
            assert row.get("status") in ("ok", "error"), row
            if row["status"] == "error":
                assert 400 <= row["http_status"] < 500, row
    assert_alive(client)


@FUZZ
@given(files=st.lists(file_bytes, min_size=1, max_size=4), ctype=st.sampled_from(["image/png", ""]))
def test_fuzz_image_bytes_through_the_decoder_are_never_5xx(client, files, ctype):
    """RELIABILITY H2, H3: valid, damaged and truncated images of every accepted format and
    random bytes behind image magic numbers reach the decoder: each is a result or a 4xx."""
    upload = [("files", (f"{i}.png", data, ctype)) for i, data in enumerate(files)]
    r = client.post("/predict/batch", files=upload)
    assert_answered(r)
    for row in r.json().get("results", []):
        assert row["status"] == "ok" or 400 <= row["http_status"] < 500, row
    single = client.post("/predict", files={"file": ("x.png", files[0], ctype)})
    assert_answered(single)
    assert_alive(client)
