"""s3:// through botocore alone: the few filesystem calls ``storage.py`` makes, without s3fs.

Cold start is the reason. s3fs reaches S3 through aiobotocore and aiohttp: importing it and making its client
costs about 0.9 s here, against 0.4 s for botocore's own client, and a cold start pays it even when the local
cache already holds the model (the object is still listed, to see whether it changed). Credentials, region,
endpoint (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``) and retries come from botocore's standard chain,
the same one s3fs ends up using. ``storage.fetch`` uses this when botocore is installed (the ``s3`` extra brings
it) and no storage options were given; anything else goes through s3fs as before.

Only what ``storage`` calls exists here: ``find``, ``info``, ``cat_file`` and fsspec's path helpers, with
fsspec's conventions (``bucket/key`` names, ``type``, ``size``, ``ETag``), and S3 errors turned into the
builtin exceptions ``storage`` explains (FileNotFoundError, PermissionError).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"})


class DirectS3:
    """A thread-safe botocore S3 client behind fsspec-style calls; ``storage`` reads ranges from threads."""

    def __init__(self) -> None:
        import botocore.session  # type: ignore[import-untyped]  # botocore ships no types

        session = botocore.session.get_session()
        # Timestamps stay the strings S3 sent (as the AWS CLI keeps them): nothing here reads LastModified, and
        # turning each listed object's into a datetime is most of the time a listing takes to parse.
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_as_sent)
        self._client = session.create_client("s3")

    @staticmethod
    def _strip_protocol(uri: str) -> str:
        """``s3://bucket/key/`` (or ``s3a://``) -> ``bucket/key``, as s3fs names paths."""
        return uri.partition("://")[2].rstrip("/") if "://" in uri else uri.rstrip("/")

    @staticmethod
    def unstrip_protocol(path: str) -> str:
        return f"s3://{path}"

    def find(self, path: str, *, detail: bool = True, withdirs: bool = False) -> dict[str, dict[str, Any]]:
        """Every object below ``path`` (a folder), or ``path`` itself when it is an object; {} when neither."""
        bucket, key = _split(path)
        prefix = f"{key}/" if key else ""
        found: dict[str, dict[str, Any]] = {}
        with _translated(path):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    name = f"{bucket}/{item['Key']}"
                    found[name] = {"name": name, "type": "file", "size": item["Size"], "ETag": item.get("ETag", "")}
        if found or not key:
            return found
        try:
            return {path: self.info(path)}
        except FileNotFoundError:
            return {}

    def info(self, path: str) -> dict[str, Any]:
        bucket, key = _split(path)
        if not key:
            raise FileNotFoundError(path)
        with _translated(path):
            head = self._client.head_object(Bucket=bucket, Key=key)
        return {"name": path, "type": "file", "size": head["ContentLength"], "ETag": head.get("ETag", "")}

    def cat_file(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` (exclusive) of one object."""
        bucket, key = _split(path)
        with _translated(path):
            answer = self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            with answer["Body"] as body:
                data: bytes = body.read()
        return data


def _as_sent(value: str) -> str:
    return value


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


@contextmanager
def _translated(path: str) -> Iterator[None]:
    """botocore's ClientError as the builtin exception ``storage`` explains; the message keeps S3's words."""
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = error.get("Message") or code or status
        if code in _NOT_FOUND or status == "404":
            raise FileNotFoundError(f"{path}: {message}") from exc
        if code in _DENIED or status == "403":
            raise PermissionError(f"{path}: {message}") from exc
        raise
