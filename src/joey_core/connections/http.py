"""``http``: a URL with headers, for webhooks and simple pulls."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field

from joey_core.connections.base import (
    ConnectionType,
    Details,
    InvalidDetails,
    Probe,
    Report,
    first_line,
    register,
)


class HttpDetails(Details):
    url: str = Field(min_length=1, max_length=8192)
    headers: dict[str, str] = Field(default_factory=dict, max_length=64)
    """Sent with every request; values of names like Authorization, *token*, *key* are secrets."""
    test_method: Literal["HEAD", "GET"] = "HEAD"
    """What a test sends (nothing is ever POSTed by a test)."""


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is reported, not followed: it could lead anywhere, past the allowed hosts."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@register
class Http(ConnectionType):
    name = "http"
    details = HttpDetails
    url_fields = frozenset({"url"})
    named_fields = frozenset({"headers"})

    def check(self, details: Any) -> None:
        assert isinstance(details, HttpDetails)
        parts = urlsplit(details.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidDetails("url", "must be an http:// or https:// URL")
        for name, value in details.headers.items():
            if not name or any(c in name for c in " :\r\n") or any(c in value for c in "\r\n"):
                raise InvalidDetails(f"headers.{name}", "not a valid header")

    def probe(self, details: Mapping[str, Any]) -> Probe:
        return Probe(hosts=(urlsplit(details["url"]).hostname or "",))

    def test(self, details: Mapping[str, Any], timeout_s: float) -> Report:
        method = details.get("test_method", "HEAD")
        # The scheme was checked on create: http or https, never file:.
        request = urllib.request.Request(  # noqa: S310
            details["url"], headers=details.get("headers", {}), method=method
        )
        opener = urllib.request.build_opener(NoRedirects())
        try:
            with opener.open(request, timeout=timeout_s) as response:
                status, reason, location = response.status, response.reason, ""
        except urllib.error.HTTPError as exc:
            status, reason, location = exc.code, exc.reason, exc.headers.get("Location", "")
        except (urllib.error.URLError, OSError) as exc:
            return Report(False, f"{method} failed: {first_line(exc)}")
        moved = f", a redirect to {location} (not followed)" if location and 300 <= status < 400 else ""
        return Report(200 <= status < 300, f"{method} answered {status} {reason}{moved}", {"status": status})
