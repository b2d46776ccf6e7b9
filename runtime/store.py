"""The model store: `s3://BUCKET/PREFIX/<model>/<run_id>/...` or the same layout in a directory.

Rules every reader and writer keeps:
- a key is written once; re-uploading identical content is a no-op, different content an error;
- `manifest.json` (every file's path, size and sha256) is written last: a model without a
  manifest does not exist to readers;
- a pull downloads into a temporary directory beside the destination and renames it only after
  every checksum matched; manifest paths that would escape the destination are rejected;
- only safetensors/JSON/tokenizer files are ever loaded from what a pull returns (spon.fuse).
boto3 reads the standard AWS configuration (env, profiles, AWS_ENDPOINT_URL); multipart transfers
for large files go through TransferConfig.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

from spon.errors import SponError

from spon.runtime.workdir import sha256_file

MANIFEST = "manifest.json"
FORMAT = "spon-store/1"
MULTIPART_BYTES = int(float(os.environ.get("SPON_S3_MULTIPART_MB", "64")) * (1 << 20))  # fractions allowed


def retry_config() -> dict:
    """Bounded retries with backoff inside boto3 (throttling such as 503 SlowDown, 5xx, dropped
    connections); the standard AWS variables win over spon's defaults. AWS_MAX_ATTEMPTS counts
    the first request too, hence total_max_attempts (Config's max_attempts would count retries)."""
    return {"total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "6")),
            "mode": os.environ.get("AWS_RETRY_MODE", "standard")}


class ChecksumError(SponError):
    """A downloaded file does not match the manifest (tampered or corrupted)."""


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def stat(self, key: str) -> dict | None:
        p = self.root / key
        return {"size": p.stat().st_size, "sha256": None} if p.is_file() else None

    def sha256(self, key: str) -> str:
        return sha256_file(self.root / key)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        dst = self.root / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.part"
        shutil.copyfile(path, tmp)
        tmp.replace(dst)  # readers never see a partial file

    def get_file(self, key: str, path: Path) -> None:
        src = self.root / key
        if not src.is_file():
            raise SponError(f"store: no such file {src}")
        shutil.copyfile(src, path)

    def get_bytes(self, key: str) -> bytes | None:
        p = self.root / key
        return p.read_bytes() if p.is_file() else None


class S3Store:
    def __init__(self, bucket: str, prefix: str = ""):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        # Bounded retries with backoff inside boto3; the Prefect task retries on top of that.
        self.client = boto3.client("s3", config=Config(retries=retry_config()))
        self.endpoint = self.client.meta.endpoint_url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _fail(self, op: str, key: str, e: Exception):
        raise SponError(f"store: {op} {self.uri(key)} at {self.endpoint} failed: {str(e).splitlines()[0]}") from e

    def stat(self, key: str) -> dict | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            self._fail("head", key, e)
        except BotoCoreError as e:  # endpoint unreachable, timeouts: one line naming endpoint and key
            self._fail("head", key, e)
        return {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get("sha256")}

    def sha256(self, key: str) -> str:
        st = self.stat(key)
        return (st or {}).get("sha256") or ""

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    ExtraArgs={"Metadata": {"sha256": sha256}}, Config=self._transfer())
        except Exception as e:
            self._fail("upload", key, e)

    def get_file(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer())
        except Exception as e:
            self._fail("download", key, e)

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            self._fail("get", key, e)
        except BotoCoreError as e:  # endpoint unreachable, timeouts: one line naming endpoint and key
            self._fail("get", key, e)


def open_store(uri: str):
    """A store and the key prefix inside it, from s3://BUCKET/PREFIX or a directory path."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise SponError(f"store URI has no bucket: {uri}")
        return S3Store(bucket, prefix)
    if "://" in uri:
        raise SponError(f"unsupported store URI {uri!r}: use s3://BUCKET/PREFIX or a directory")
    return LocalStore(uri)


def model_uri(store_uri: str, model: str, run_id: str) -> str:
    return f"{store_uri.rstrip('/')}/{model}/{run_id}"


def push(local_dir: str | Path, store_uri: str, model: str, run_id: str) -> str:
    """Upload a directory; idempotent. Returns the stored model's URI."""
    src = Path(local_dir)
    store = open_store(store_uri)
    base = f"{model}/{run_id}"
    files = [{"path": f.relative_to(src).as_posix(), "size": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(p for p in src.rglob("*") if p.is_file())]
    manifest = json.dumps({"format": FORMAT, "files": files}, indent=2, sort_keys=True).encode()
    existing = store.get_bytes(f"{base}/{MANIFEST}")
    if existing is not None:
        if existing == manifest:
            return model_uri(store_uri, model, run_id)
        raise SponError(f"store: {store.uri(base)} already holds a different model; keys are never overwritten")
    for entry in files:
        key = f"{base}/{entry['path']}"
        st = store.stat(key)
        if st is not None:
            # A previous attempt died after this file: keep it if identical, never overwrite it.
            if st["size"] == entry["size"] and store.sha256(key) == entry["sha256"]:
                continue
            raise SponError(f"store: {store.uri(key)} exists with different content; keys are never overwritten")
        store.put_file(key, src / entry["path"], entry["sha256"])
    tmp = src.parent / f".{src.name}.{MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(manifest)
    try:
        store.put_file(f"{base}/{MANIFEST}", tmp, sha256_file(tmp))  # last: now the model exists
    finally:
        tmp.unlink(missing_ok=True)
    return model_uri(store_uri, model, run_id)


def _safe_relpath(p: str) -> PurePosixPath:
    rel = PurePosixPath(p)
    if not p or rel.is_absolute() or "\\" in p or any(part in ("..", "") for part in rel.parts) or ":" in rel.parts[0]:
        raise SponError(f"manifest entry {p!r} would escape the destination directory")
    return rel


def read_manifest(uri: str) -> dict:
    store = open_store(uri)
    raw = store.get_bytes(MANIFEST)
    if raw is None:
        raise SponError(f"no model at {uri}: it has no {MANIFEST} (never finished uploading?)")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SponError(f"{uri}/{MANIFEST} is not valid JSON") from e
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
        raise SponError(f"{uri}/{MANIFEST}: unknown format {manifest.get('format')!r}")
    return manifest


def pull(uri: str, out_dir: str | Path) -> Path:
    """Download a stored model into out_dir, verifying every file against the manifest."""
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise SponError(f"destination {out} exists and is not empty")
    manifest = read_manifest(uri)
    entries = [(_safe_relpath(e["path"]), e) for e in manifest["files"]]
    store = open_store(uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.pull-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for rel, e in entries:
            dst = tmp.joinpath(*rel.parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(rel.as_posix(), dst)
            got = sha256_file(dst)
            if got != e["sha256"]:
                raise ChecksumError(f"checksum mismatch for {rel} from {uri}: expected sha256 {e['sha256'][:12]}…, got {got[:12]}…")
            if dst.stat().st_size != e["size"]:
                raise ChecksumError(f"size mismatch for {rel} from {uri}: the manifest says {e['size']} bytes, "
                                    f"the file has {dst.stat().st_size} (its sha256 matches: the manifest was altered)")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
