"""The model store: manifest-last uploads, idempotence, no overwrite, verified pulls (local
directory and S3 over HTTP via moto's server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spon.errors import SponError
from spon.runtime import store


def make_model(d: Path) -> Path:
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "tok.json").write_text("{}")
    return d


def tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_local_roundtrip_idempotent_and_no_overwrite(tmp_path):
    src = make_model(tmp_path / "src")
    uri = store.push(src, str(tmp_path / "store"), "m", "run1")
    assert uri == str(tmp_path / "store" / "m" / "run1")
    assert store.push(src, str(tmp_path / "store"), "m", "run1") == uri  # idempotent
    out = store.pull(uri, tmp_path / "out")
    assert tree(out) == tree(src)
    (src / "config.json").write_text('{"a": 2}')
    with pytest.raises(SponError, match="never overwritten"):
        store.push(src, str(tmp_path / "store"), "m", "run1")


def test_no_manifest_means_no_model(tmp_path):
    src = make_model(tmp_path / "src")
    uri = store.push(src, str(tmp_path / "store"), "m", "r")
    (Path(uri) / store.MANIFEST).unlink()
    with pytest.raises(SponError, match="no manifest.json"):
        store.pull(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "a/../../b", "C:/x", ""])
def test_manifest_escape_rejected(tmp_path, bad):
    src = make_model(tmp_path / "src")
    uri = store.push(src, str(tmp_path / "store"), "m", "r")
    m = json.loads((Path(uri) / store.MANIFEST).read_text())
    m["files"].append({"path": bad, "size": 1, "sha256": "0" * 64})
    (Path(uri) / store.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SponError, match="escape"):
        store.pull(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_tampered_byte_fails_and_leaves_nothing(tmp_path):
    src = make_model(tmp_path / "src")
    uri = store.push(src, str(tmp_path / "store"), "m", "r")
    f = Path(uri) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(store.ChecksumError, match="model.safetensors"):
        store.pull(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_s3_multipart_roundtrip(tmp_path, s3_endpoint, monkeypatch):
    from pipeline_helpers import BUCKET

    monkeypatch.setattr(store, "MULTIPART_BYTES", 5 << 20)  # S3's minimum part size
    src = make_model(tmp_path / "src")
    (src / "big.safetensors").write_bytes(b"\x01" * (11 << 20))  # 3 parts
    uri = store.push(src, f"s3://{BUCKET}/models", "m", "run1")
    assert uri == f"s3://{BUCKET}/models/m/run1"
    assert store.push(src, f"s3://{BUCKET}/models", "m", "run1") == uri
    import boto3

    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="models/m/run1/big.safetensors")
    assert "-" in head["ETag"]  # a multipart upload's ETag carries the part count
    out = store.pull(uri, tmp_path / "out")
    assert tree(out) == tree(src)


def test_s3_errors_name_endpoint_and_key(tmp_path, s3_endpoint):
    with pytest.raises(SponError, match=r"no model at s3://spon-test/nothing/here"):
        store.pull("s3://spon-test/nothing/here", tmp_path / "out")
    with pytest.raises(SponError, match=s3_endpoint):
        store.push(make_model(tmp_path / "src"), "s3://no-such-bucket-x/p", "m", "r")
