"""Every user mistake on the command line: one ``error:`` line naming what is wrong and what is valid, exit code 2,
no traceback; ``--json`` output is strict JSON; image files and URLs fail in one line; the image-URL cache is keyed
by the URL and never keeps a broken download; the network probe cannot hang.

Two kinds of rejection, both exactly one ``error:`` line and exit code 2: the parser's (``helpers.usage.OneLineParser``:
``error: python -m helpers CMD: argument ...``) for a value that is wrong whatever the model, and the command's for
what needs the model or the data to decide.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from helpers import cli, runtime
from helpers.data import photos
from tests.conftest import REPO

CPU_RANDOM = ["--weights", "random", "--device", "cpu"]


# --- helpers ----------------------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr), argparse's SystemExit included."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_rejected(code: int, out: str, err: str, fragments: list[str]) -> None:
    """Exit 2, nothing on stdout, no traceback, stderr exactly one ``error:`` line naming every fragment."""
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err, err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """COLLISIONS_OFFLINE=1 for one test, restored afterwards (``--offline`` sets it too)."""
    monkeypatch.setenv("COLLISIONS_OFFLINE", "1")
    runtime.network_available.cache_clear()
    yield
    runtime.network_available.cache_clear()


@pytest.fixture
def image_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private COLLISIONS_CACHE; returns its images folder."""
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (greyscale) with an empty image stream: opened, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _photo_bytes(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def bad_images(tmp_path: Path) -> dict[str, Path]:
    """Image files a user may pass by mistake: empty, text, truncated, a 20000 x 20000 decompression bomb."""
    whole = _photo_bytes((200, 30, 30), "JPEG")
    files = {
        "empty": b"",
        "text": b"this is a text file, not an image\n",
        "truncated": whole[: len(whole) // 2],
        "bomb": _png(20000, 20000),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.{'png' if name != 'truncated' else 'jpg'}"
        paths[name].write_bytes(data)
    return paths


# --- argparse-level: ranges and finite numbers ------------------------------------------------------------

PARSE_ERRORS = [
    # (argv, what the error line names)
    (["collide", "lenet5", "--beta", "nan"], ["--beta", "finite"]),
    (["collide", "lenet5", "--beta", "inf"], ["--beta", "finite"]),
    (["collide", "lenet5", "--beta=-inf"], ["--beta", "finite"]),
    (["collide", "lenet5", "--beta", "0"], ["--beta", "nonzero"]),
    (["collide", "lenet5", "--seed", "-1"], ["--seed", "0..4294967295"]),
    (["collide", "lenet5", "--seed", "1.5"], ["--seed", "integer"]),
    (["attacks", "resnet50", "--size", "0"], ["--size", ">= 1"]),
    (["attacks", "resnet50", "--size", "-3"], ["--size", ">= 1"]),
    (["attacks", "resnet50", "--steps", "0"], ["--steps", ">= 1"]),
    (["attacks", "resnet50", "--n", "0"], ["--n", ">= 1"]),
    (["attacks", "resnet50", "--reach", "0"], ["--reach", "(0, 1]"]),
    (["attacks", "resnet50", "--reach", "1.5"], ["--reach", "(0, 1]"]),
    (["attacks", "resnet50", "--reach", "nan"], ["--reach", "(0, 1]"]),
    (["polytope", "lenet5", "--vertices", "0"], ["--vertices", ">= 2"]),
    (["polytope", "lenet5", "--vertices", "1"], ["--vertices", ">= 2"]),
    (["polytope", "lenet5", "--samples", "0"], ["--samples", ">= 1"]),
    (["polytope", "lenet5", "--steps", "0"], ["--steps", ">= 1"]),
    (["polytope", "lenet5", "--alpha", "nan"], ["--alpha", "finite", "> 0"]),
    (["polytope", "lenet5", "--alpha", "-1"], ["--alpha", "> 0"]),
    (["polytope", "lenet5", "--lr", "inf"], ["--lr", "finite"]),
    (["polytope", "lenet5", "--lr", "0"], ["--lr", "> 0"]),
    (["gauge", "--epochs", "0"], ["--epochs", ">= 1"]),
    (["gauge", "--train-size", "-5"], ["--train-size", "1..60000"]),
    (["gauge", "--train-size", "0"], ["--train-size", "1..60000"]),
    (["gauge", "--train-size", "70000"], ["--train-size", "1..60000"]),
    (["gauge", "--n-boot", "0"], ["--n-boot", ">= 1"]),
    (["gauge", "--seeds", "0"], ["--seeds", ">= 1"]),
    (["gauge", "--seeds", "-1"], ["--seeds", ">= 1"]),
    (["load", "lenet5", "--weights", "trained"], ["--weights", "invalid choice"]),
]


@pytest.mark.parametrize(("argv", "fragments"), PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_a_bad_number_is_rejected_by_the_parser(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    _assert_rejected(*_run(capsys, argv), fragments)


# --- command-level: devices, budgets, tasks, images -----------------------------------------------------------

COMMAND_ERRORS = [
    (["load", "lenet5", "--weights", "random", "--device", "mps"], ["'mps'", "available here: auto, cpu"]),
    (["load", "lenet5", "--weights", "random", "--device", "xpu"], ["'xpu'", "available here: auto, cpu"]),
    (["load", "lenet5", "--weights", "random", "--device", "hpu"], ["'hpu'", "valid: auto, cpu, cuda"]),
    (["load", "lenet5", "--weights", "random", "--device", "cuda:99"], ["'cuda:99'", "available here"]),
    (["collide", "lenet5", "--weights", "random", "--device", "mps"], ["'mps'"]),
    (["attacks", "deit_tiny_patch16_224", "--weights", "random", "--device", "xpu"], ["'xpu'"]),
    (["polytope", "lenet5", "--weights", "random", "--device", "mps"], ["'mps'"]),
    (["gauge", "--quick", "--device", "mps"], ["'mps'"]),
    # the meta device has shapes and no data: fine for load and audit, a traceback anywhere else
    (["collide", "lenet5", "--weights", "random", "--device", "meta"], ["--device meta", "collide", "valid: auto"]),
    (["polytope", "lenet5", "--weights", "random", "--device", "meta"], ["--device meta", "polytope"]),
    (["gauge", "--quick", "--device", "meta"], ["--device meta", "gauge"]),
    (["attacks", "deit_tiny_patch16_224", "--weights", "random", "--device", "meta"], ["--device meta"]),
    (["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--eps", "1/0"], ["'1/0'", "8/255"]),
    (["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--eps=-0.1"], ["-0.1", "0 < eps <= 1"]),
    (["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--eps", "2"], ["--eps 2", "0 < eps <= 1"]),
    (["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--eps", "nan"], ["--eps nan", "0 < eps <= 1"]),
    (["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--eps", "inf/255"], ["inf/255", "0 < eps <= 1"]),
    (["attacks", "lenet5", *CPU_RANDOM], ["'lenet5' is a mnist model", "classifiers", "deit_tiny"]),
    (["attacks", "unet_resnet34", *CPU_RANDOM], ["'unet_resnet34' is a segmentation model"]),
    (["collide", "fasterrcnn_mobilenet_v3_large_320_fpn", *CPU_RANDOM], ["localization", "valid:", "resnet50"]),
    (["collide", "retinanet_resnet50_fpn", *CPU_RANDOM], ["localization", "valid:"]),
    (["collide", "maskrcnn_resnet50_fpn", *CPU_RANDOM], ["localization"]),
    (["collide", "unet_resnet34", *CPU_RANDOM], ["'unet_resnet34'", "1 class", "valid:", "fcn_resnet50"]),
    (["collide", "pspnet_resnet34", *CPU_RANDOM], ["'pspnet_resnet34'", "1 class"]),
    (["collide", "lenet5", *CPU_RANDOM, "--image", "astronaut"], ["--image", "MNIST", "lenet5"]),
]


@pytest.mark.parametrize(("argv", "fragments"), COMMAND_ERRORS, ids=[" ".join(a) for a, _ in COMMAND_ERRORS])
def test_a_bad_combination_is_one_error_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    _assert_rejected(*_run(capsys, argv), fragments)


def test_attacks_names_the_size_a_model_takes(capsys: pytest.CaptureFixture[str]) -> None:
    # DeiT's patch embedding takes 224 x 224 only: --size 100 used to end in timm's AssertionError
    code, out, err = _run(capsys, ["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--size", "100", "--n", "2"])
    _assert_rejected(code, out, err, ["--size 100", "deit_tiny_patch16_224", "224"])


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "bomb"])
@pytest.mark.parametrize("command", ["collide", "attacks"])
def test_a_bad_image_file_is_one_error_line(
    capsys: pytest.CaptureFixture[str], bad_images: dict[str, Path], kind: str, command: str
) -> None:
    model = "mobilenet_v3_large" if command == "collide" else "deit_tiny_patch16_224"
    code, out, err = _run(capsys, [command, model, *CPU_RANDOM, "--image", str(bad_images[kind])])
    words = {"empty": "empty", "text": "not an image", "truncated": "truncated", "bomb": "20000 x 20000"}
    _assert_rejected(code, out, err, [str(bad_images[kind]), words[kind]])


def test_an_image_url_offline_is_one_error_line(
    capsys: pytest.CaptureFixture[str], image_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLLISIONS_OFFLINE", "0")  # restored afterwards: --offline sets it to 1
    try:
        argv = ["--offline", "collide", "mobilenet_v3_large", *CPU_RANDOM, "--image", "https://example.org/cat.png"]
        _assert_rejected(*_run(capsys, argv), ["https://example.org/cat.png", "offline", "sample name"])
        assert os.environ["COLLISIONS_OFFLINE"] == "1"
    finally:
        runtime.network_available.cache_clear()


# --- images: files and URLs (helpers.data.photos) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "words"),
    [("empty", "empty (0 bytes)"), ("text", "not an image"), ("truncated", "truncated"), ("bomb", "20000 x 20000")],
)
def test_load_image_rejects_a_bad_file_in_one_line(bad_images: dict[str, Path], kind: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        photos.load_image(bad_images[kind])
    message = str(info.value)
    assert "\n" not in message and words in message and str(bad_images[kind]) in message, message
    assert "valid:" in message or kind in ("truncated", "bomb"), message


class _Server:
    """A local HTTP server in a thread: ``routes`` path -> (body, Content-Length sent or None for the true one)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}
        self.hits: list[str] = []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                if self.path not in routes:
                    self.send_error(404)
                    return
                body, length = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    monkeypatch.delenv("COLLISIONS_OFFLINE", raising=False)
    running = _Server()
    yield running
    running.close()


def _colour(image: Image.Image) -> tuple[int, ...]:
    pixel = image.getpixel((5, 5))
    assert isinstance(pixel, tuple)
    return pixel


def test_two_urls_with_the_same_file_name_do_not_collide(server: _Server, image_cache: Path) -> None:
    server.routes["/a/cat.png"] = (_photo_bytes((255, 0, 0)), None)
    server.routes["/b/cat.png"] = (_photo_bytes((0, 0, 255)), None)
    assert _colour(photos.load_image(server.url("/a/cat.png"))) == (255, 0, 0)
    assert _colour(photos.load_image(server.url("/b/cat.png"))) == (0, 0, 255)
    assert photos.url_cache_path(server.url("/a/cat.png")) != photos.url_cache_path(server.url("/b/cat.png"))
    # cached: a second load does not download again
    assert _colour(photos.load_image(server.url("/a/cat.png"))) == (255, 0, 0)
    assert server.hits == ["/a/cat.png", "/b/cat.png"]
    assert sorted(p.name for p in image_cache.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_a_download_cut_short_is_not_cached(server: _Server, image_cache: Path) -> None:
    whole = _photo_bytes((0, 200, 0))
    server.routes["/short.png"] = (whole[: len(whole) // 2], len(whole))  # the server promises more than it sends
    url = server.url("/short.png")
    with pytest.raises(ValueError, match="cut short") as info:
        photos.load_image(url)
    assert "\n" not in str(info.value)
    assert not photos.url_cache_path(url).exists() and not list(image_cache.glob(".*"))
    server.routes["/short.png"] = (whole, None)  # the next try gets the whole file
    assert _colour(photos.load_image(url)) == (0, 200, 0)


def test_a_url_that_is_not_an_image_is_not_cached(server: _Server, image_cache: Path) -> None:
    server.routes["/page.png"] = (b"<html>not found, but with status 200</html>", None)
    url = server.url("/page.png")
    with pytest.raises(ValueError, match="not an image"):
        photos.load_image(url)
    assert not photos.url_cache_path(url).exists()
    with pytest.raises(ValueError, match="404"):
        photos.load_image(server.url("/missing.png"))


def test_a_damaged_cached_image_is_discarded_and_downloaded_again(
    server: _Server, image_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = _photo_bytes((10, 20, 30))
    server.routes["/cat.png"] = (whole, None)
    url = server.url("/cat.png")
    photos.load_image(url)
    cached = photos.url_cache_path(url)
    cached.write_bytes(whole[: len(whole) // 3])  # truncated on disk after the fact
    assert _colour(photos.load_image(url)) == (10, 20, 30)
    assert server.hits == ["/cat.png", "/cat.png"] and cached.read_bytes() == whole
    assert "discarded" in capsys.readouterr().err


def test_an_image_url_offline_uses_the_cache_or_says_so(server: _Server, image_cache: Path, offline: None) -> None:
    url = server.url("/cat.png")
    with pytest.raises(ValueError, match="offline") as info:
        photos.load_image(url)
    assert "\n" not in str(info.value) and server.hits == []
    photos.url_cache_path(url).parent.mkdir(parents=True, exist_ok=True)
    photos.url_cache_path(url).write_bytes(_photo_bytes((1, 2, 3)))
    assert _colour(photos.load_image(url)) == (1, 2, 3) and server.hits == []


# --- strict JSON ----------------------------------------------------------------------------------------------


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_maps_nan_and_infinity_to_null() -> None:
    data = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": 2}, "e": (3, float("nan"))}
    assert _strict(cli.json_text(data)) == {"a": None, "b": [1.0, None, None], "c": {"d": 2}, "e": [3, None]}
    import numpy as np
    import torch

    assert _strict(cli.json_text({"x": np.float32("nan"), "y": np.int64(3), "z": torch.tensor(1.5)})) == {
        "x": None,
        "y": 3,
        "z": 1.5,
    }


def test_gauge_json_is_strict_when_a_correlation_is_undefined(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # gauge --quick with the defaults printed NaN (a constant risk column has no rank correlation)
    from helpers.experiments import gauge

    row = {"family": "mlp", "width": 8, "seed": 0, "clean_acc": 0.5, "median_l2": math.nan}
    monkeypatch.setattr(gauge, "run_sweep", lambda *a, **k: [row])
    monkeypatch.setattr(gauge, "correlation_table", lambda *a, **k: [{"risk": "r", "pooled": math.nan}])
    monkeypatch.setattr(gauge, "table_jsonable", lambda table: table)
    code, out, _ = _run(capsys, ["gauge", "--quick", "--seeds", "1", "--device", "cpu", "--json"])
    assert code == 0
    parsed = _strict(out)
    assert parsed == {"rows": [{**row, "median_l2": None}], "correlations": [{"risk": "r", "pooled": None}]}


# --- devices and the network --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:1", "cuda:99", "hpu", "gpu0"])
def test_resolve_device_rejects_what_this_machine_lacks(device: str) -> None:
    if device in runtime.available_devices():
        pytest.skip(f"{device} exists here")
    with pytest.raises(ValueError) as info:
        runtime.resolve_device(device)
    assert repr(device) in str(info.value) and "available here: auto, cpu" in str(info.value)


def test_valid_devices_are_the_ones_resolve_device_knows() -> None:
    for device in runtime.available_devices():
        runtime.resolve_device(device)
    assert set(runtime.available_devices()) <= {*runtime.VALID_DEVICES, *(f"cuda:{i}" for i in range(16))} | {
        f"xpu:{i}" for i in range(16)
    }


def test_the_network_probe_cannot_hang_on_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hanging_dns(*args: object, **kwargs: object) -> list[object]:
        release.wait(30)  # a resolver that never answers (the probe's thread is a daemon: it is abandoned)
        raise socket.gaierror("no answer")

    monkeypatch.delenv("COLLISIONS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", hanging_dns)
    runtime.network_available.cache_clear()
    try:
        start = time.perf_counter()
        assert runtime.network_available(0.3) is False
        assert time.perf_counter() - start < 1.5
    finally:
        release.set()
        runtime.network_available.cache_clear()


def test_offline_flag_skips_the_probe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed the network although offline was asked for")

    monkeypatch.setenv("COLLISIONS_OFFLINE", "0")
    monkeypatch.setattr(socket, "create_connection", no_probe)
    runtime.network_available.cache_clear()
    try:
        code, out, _ = _run(capsys, ["--offline", "load", "lenet5", "--device", "cpu", "--json"])
        assert code == 0 and json.loads(out)["weights"] in ("random", "pretrained")
        assert os.environ["COLLISIONS_OFFLINE"] == "1" and runtime.network_available() is False
    finally:
        runtime.network_available.cache_clear()


# --- as a program: exit code 2 and one line, no traceback -----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["load", "lenet5", "--weights", "random", "--device", "mps"], ["'mps'"]),
        (["gauge", "--epochs", "0"], ["--epochs"]),
        (
            ["--offline", "collide", "mobilenet_v3_large", *CPU_RANDOM, "--image", "http://example.org/a.png"],
            ["'http://example.org/a.png' is not cached", "offline"],
        ),
    ],
    ids=["device", "parser", "url-offline"],
)
def test_python_m_helpers_exits_2_in_one_line(argv: list[str], fragments: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "helpers", *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    _assert_rejected(done.returncode, done.stdout, done.stderr, fragments)


def test_offline_goes_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    assert [parser.parse_args(a).offline for a in (["load", "x"], ["models"])] == [False, False]
    assert all(parser.parse_args(a).offline for a in (["load", "x", "--offline"], ["--offline", "load", "x"]))
