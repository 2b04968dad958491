"""Locations as tensorstore kvstores: one way to name local folders and remote stores alike."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

import tensorstore as ts

_REMOTE_SCHEMES = ("file://", "http://", "https://", "gs://", "s3://", "memory://")

#: tensorstore's HTTP transport (curl; used by the http, gcs and s3 kvstores) reads these once, when it
#: is first used, for the whole process: a connection must open within 10 s, and a response that
#: delivers no byte for 10 s counts as stalled (a transient failure, retried). Set them in the
#: environment before the first remote read to change them (an explicit setting is kept).
CURL_ENVIRONMENT = {
    "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": "10",
    "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "10",
    "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1",
}
for _name, _value in CURL_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

T = TypeVar("T")


class RemoteReadError(OSError):
    """A remote store did not answer within its limits, or refused after every retry."""


@dataclass(frozen=True)
class RemoteLimits:
    """Bounds on every remote (http, gcs, s3) read, so an unreachable store fails instead of hanging.

    `timeout_s` is the total deadline of one wait (a metadata document, a store open, one step's
    pixels), retries included; transient failures (HTTP 5xx, a reset connection, a stall) are retried
    by tensorstore up to `retries` times, the delay doubling from `retry_delay_s` up to
    `retry_max_delay_s`. The defaults fail an unreachable store within 30 s. YAML: a `remote:`
    mapping with these keys, at collection level and/or per experiment (the experiment's keys win;
    `sampler.collection.RemoteEntry` validates it).
    """

    timeout_s: float = 30.0
    retries: int = 4
    retry_delay_s: float = 0.5
    retry_max_delay_s: float = 4.0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "retry_delay_s", "retry_max_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"remote {name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"remote retries must be a whole number >= 0, got {self.retries!r}")
        if self.retry_max_delay_s < self.retry_delay_s:
            raise ValueError(
                f"remote retry_max_delay_s ({self.retry_max_delay_s}) must be >= retry_delay_s ({self.retry_delay_s})"
            )

    def context_spec(self) -> dict[str, Any]:
        """tensorstore Context resources: the same retry policy for the http, gcs and s3 kvstores."""
        retries = {"max_retries": self.retries, "initial_delay": f"{self.retry_delay_s}s",
                   "max_delay": f"{self.retry_max_delay_s}s"}
        return {f"{kind}_request_retries": dict(retries) for kind in ("http", "gcs", "s3")}

    def wait(self, future: "ts.Future[T]", what: str, deadline: float | None = None) -> T:
        """`future.result()`, waiting at most until `deadline` (time.monotonic(); default now + timeout_s).

        A timeout cancels the operation and raises RemoteReadError naming `what` (a URL, with the
        experiment where the caller knows it) and the limit to raise.
        """
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()
            raise RemoteReadError(
                f"{what}: no answer within remote timeout_s={self.timeout_s:g} s; check that the server is "
                "reachable, or raise 'remote: {timeout_s: ...}' in the collection YAML (reader option remote=)"
            ) from None


_CONTEXTS: dict[tuple[RemoteLimits, int], ts.Context] = {}


def remote_context(limits: RemoteLimits) -> ts.Context:
    """One tensorstore Context per retry policy and process (never shared across a fork)."""
    key = (limits, os.getpid())
    context = _CONTEXTS.get(key)
    if context is None:
        context = _CONTEXTS[key] = ts.Context(limits.context_spec())
    return context


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


def read_remote(url: str, key: str, limits: RemoteLimits) -> bytes | None:
    """The value of `key` under the remote `url` (None when missing), within `limits`.

    Failures raise RemoteReadError naming the URL: a timeout, or an error after the retries.
    """
    deadline = time.monotonic() + limits.timeout_s
    try:
        store = limits.wait(ts.KvStore.open(url, context=remote_context(limits)), url, deadline)
        result = limits.wait(store.read(key), url + key, deadline)
    except RemoteReadError:
        raise
    except (ValueError, OSError) as err:  # tensorstore's errors after its retries
        raise RemoteReadError(
            f"{url}{key}: {err}; check the URL and that the server is reachable (failed after remote "
            f"retries={limits.retries}; 'remote:' in the collection YAML sets retries and timeout_s)"
        ) from None
    return bytes(result.value) if result.state == "value" else None


def list_remote(url: str, limits: RemoteLimits) -> list[str]:
    """Keys directly under the remote `url` (no '/' in them), within `limits`."""
    deadline = time.monotonic() + limits.timeout_s
    try:
        store = limits.wait(ts.KvStore.open(url, context=remote_context(limits)), url, deadline)
        keys = limits.wait(store.list(), url, deadline)
    except RemoteReadError:
        raise
    except (ValueError, OSError) as err:
        raise RemoteReadError(
            f"{url}: listing failed: {err}; check the URL and that the server is reachable (failed after remote "
            f"retries={limits.retries}; 'remote:' in the collection YAML sets retries and timeout_s)"
        ) from None
    return [k.decode() for k in keys if b"/" not in k]


def read_json(url: str, key: str, limits: RemoteLimits = RemoteLimits()) -> dict[str, Any] | None:
    """The JSON document `key` under `url`, or None when it does not exist (remote reads within `limits`)."""
    if is_local(url):
        path = os.path.join(local_path(url), key)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            raw = f.read()
    else:
        raw = read_remote(url, key, limits)
        if raw is None:
            return None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}{key} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{url}{key} is not a JSON object (it holds a {type(doc).__name__}); zarr metadata is an "
                         "object such as {\"zarr_format\": 3, \"node_type\": \"group\", ...}: fix or rewrite it")
    return doc
