"""Locations as tensorstore kvstores: one way to name local folders and remote stores alike."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import unquote

import tensorstore as ts

_REMOTE_SCHEMES = ("file://", "http://", "https://", "gs://", "s3://", "memory://")


def to_url(path: str | os.PathLike[str]) -> str:
    """A kvstore URL for a local path or a URL tensorstore understands, ending in '/'."""
    text = os.fspath(path)
    if not text.startswith(_REMOTE_SCHEMES):
        if "://" in text:
            raise ValueError(
                f"unsupported location {text!r}: use a local path or one of {', '.join(_REMOTE_SCHEMES)}"
            )
        text = "file://" + _escape(os.path.abspath(text))
    return text if text.endswith("/") else text + "/"


def _escape(path: str) -> str:
    """A local path as a file:// URL path: '%', '?' and '#' percent-encoded, since tensorstore
    decodes URLs (a folder 'p%41q' would otherwise open as 'pAq'); everything else kept readable."""
    return path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")


def join(url: str, *parts: str) -> str:
    """`url` extended by path components, ending in '/'."""
    out = url
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part + "/"
    return out


def is_local(url: str) -> bool:
    return url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a file:// URL (no trailing slash)."""
    if not is_local(url):
        raise ValueError(f"{url} is not a local path")
    return unquote(url[len("file://") :]).rstrip("/") or "/"


def read_json(url: str, key: str) -> dict[str, Any] | None:
    """The JSON document `key` under `url`, or None when it does not exist."""
    if is_local(url):
        path = os.path.join(local_path(url), key)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            raw = f.read()
    else:
        result = ts.KvStore.open(url).result().read(key).result()
        if result.state != "value":
            return None
        raw = bytes(result.value)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}{key} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{url}{key} is not a JSON object (it holds a {type(doc).__name__}); zarr metadata is an "
                         "object such as {\"zarr_format\": 3, \"node_type\": \"group\", ...}: fix or rewrite it")
    return doc
