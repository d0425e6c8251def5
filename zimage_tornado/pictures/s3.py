"""The picture store in an S3-compatible bucket (AWS S3, R2, MinIO, Ceph, rclone serve s3), so
that every instance of a fleet serves every picture: `{prefix}/objects/<sha256>`,
`{prefix}/tasks/<uuid>.json` and `{prefix}/expiring/<when>_<uuid>` (a key's shorter
pictures_ttl). A PUT is whole or nothing by S3's own rule, so no temporary names.

The client is MinIO's Python SDK (`minio`): small, pure Python, kept by MinIO, and it speaks to
any S3-compatible server with AWS Signature V4; it is blocking, and runs on the keeper's own
thread like the directory's file calls. Credentials come from the standard AWS environment
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or the AWS credentials
file (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), never from the settings or the logs.
"""

from __future__ import annotations

import io
from typing import Any, Iterator
from urllib.parse import urlsplit

from zimage_tornado.pictures import MANIFEST_LIMIT, Backend

TIMEOUT_SECONDS = 10.0  # connect and each read of one S3 call: a stuck server fails the call, not the thread


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` as (bucket, prefix without slashes)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("pictures_s3_url must be s3://bucket or s3://bucket/prefix, got %r" % url[:200])
    return parts.netloc, parts.path.strip("/")


def parse_endpoint(url: str) -> tuple[str, bool]:
    """`https://host:port` as ("host:port", secure)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise ValueError("pictures_s3_endpoint must be http(s)://host[:port], got %r" % url[:200])
    return parts.netloc, parts.scheme == "https"


class Bucket(Backend):
    name = "s3"

    def __init__(self, url: str, endpoint: str, region: str) -> None:
        import urllib3
        from minio import Minio
        from minio.credentials import AWSConfigProvider, ChainedProvider, EnvAWSProvider

        self.bucket, prefix = parse_bucket_url(url)
        self.prefix = prefix + "/" if prefix else ""
        host, secure = parse_endpoint(endpoint)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=TIMEOUT_SECONDS, read=TIMEOUT_SECONDS),
                                   retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                                         status_forcelist=(500, 502, 503, 504)),
                                   maxsize=4)
        self.client = Minio(host, secure=secure, region=region or None, http_client=http,
                            credentials=ChainedProvider([EnvAWSProvider(), AWSConfigProvider()]))
        self.url = "s3://%s/%s" % (self.bucket, prefix)
        if not self.client.bucket_exists(self.bucket):
            raise ValueError("pictures_s3_url: the bucket %s does not exist at %s" % (self.bucket, host))

    def _object(self, digest: str) -> str:
        return "%sobjects/%s" % (self.prefix, digest)

    def _manifest(self, uuid: str) -> str:
        return "%stasks/%s.json" % (self.prefix, uuid)

    def _put(self, key: str, data: bytes, media_type: str) -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=media_type)

    def _get(self, key: str, limit: int) -> bytes | None:
        from minio.error import InvalidResponseError, S3Error

        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NotFound"):
                return None
            raise
        except InvalidResponseError as e:  # some servers answer a missing key without an XML body
            if getattr(e, "_code", None) == 404:
                return None
            raise
        try:
            data: bytes = response.read(limit)
            return data
        finally:
            response.close()
            response.release_conn()

    def put_object(self, digest: str, data: bytes, media_type: str) -> None:
        self._put(self._object(digest), data, media_type)

    def refresh_object(self, digest: str, data: bytes) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._object(digest))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NotFound"):
                return False
            raise
        self._put(self._object(digest), data, "application/octet-stream")  # S3 has no touch: written anew
        return True

    def get_object(self, digest: str, limit: int) -> bytes | None:
        return self._get(self._object(digest), limit)

    def delete_object(self, digest: str) -> None:
        self.client.remove_object(self.bucket, self._object(digest))

    def list_objects(self) -> Iterator[tuple[str, int, float]]:
        for item in self.client.list_objects(self.bucket, prefix=self.prefix + "objects/", recursive=True):
            modified: Any = item.last_modified
            yield item.object_name.rpartition("/")[2], int(item.size or 0), modified.timestamp() if modified else 0.0

    def put_manifest(self, uuid: str, data: bytes) -> None:
        self._put(self._manifest(uuid), data, "application/json")

    def get_manifest(self, uuid: str) -> bytes | None:
        return self._get(self._manifest(uuid), MANIFEST_LIMIT)

    def old_manifests(self, before: float) -> Iterator[str]:
        for item in self.client.list_objects(self.bucket, prefix=self.prefix + "tasks/", recursive=True):
            name = item.object_name.rpartition("/")[2]
            if name.endswith(".json") and item.last_modified is not None and item.last_modified.timestamp() < before:
                yield name[:-len(".json")]

    def delete_manifest(self, uuid: str) -> None:
        self.client.remove_object(self.bucket, self._manifest(uuid))

    def mark_expiry(self, uuid: str, at: float) -> None:
        self._put("%sexpiring/%d_%s" % (self.prefix, at, uuid), b"", "application/octet-stream")

    def due_expiries(self, now: float) -> Iterator[tuple[str, str]]:
        for item in self.client.list_objects(self.bucket, prefix=self.prefix + "expiring/", recursive=True):
            at, _, uuid = item.object_name.rpartition("/")[2].partition("_")
            if at.isdigit() and int(at) <= now:
                yield uuid, item.object_name

    def clear_expiry(self, mark: str) -> None:
        self.client.remove_object(self.bucket, mark)

    def describe(self) -> str:
        return self.url
