"""What the process environment says about reaching Tpaga, read once per transport for both HTTP stacks.

Proxies: `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (and `ALL_PROXY` for requests, which supports it) as requests
reads them, except that a loopback API URL is never proxied: the loopback exemption allows plain http there,
and through a proxy that would carry the private key in clear text off the machine. CA bundle:
`REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE` when set, else certifi's, for https only. `.netrc` is never read: the
keys are sent as explicit auth.

Read once because both stacks would otherwise look the variables up on every request (requests scans the
whole environment for proxies when `trust_env` is on; aiohttp's `trust_env` does it in a thread).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlparse

from requests.utils import get_environ_proxies

from billing.config import is_loopback_host


@dataclass(frozen=True)
class HttpEnvironment:
    """The proxies and CA bundle for one API URL."""

    api_url: str
    proxies: dict[str, str] = field(default_factory=dict)  # requests' form: {"http"|"https"|"all": proxy URL}
    ca_bundle: str | None = None  # None: certifi's (https), or no TLS at all (http)

    @property
    def https(self) -> bool:
        return self.api_url.startswith("https:")

    @property
    def proxy(self) -> str | None:
        """The proxy for the API URL's scheme, for aiohttp (which speaks to HTTP proxies only, so no ALL_PROXY)."""
        return self.proxies.get(urlparse(self.api_url).scheme)

    def verify(self) -> str | bool:
        """requests' `verify`: the bundle's path, or True for requests' default (certifi's)."""
        return self.ca_bundle or True

    def ssl_context(self) -> ssl.SSLContext | bool:
        """aiohttp's `ssl`: a context on the bundle (certifi's by default) for https; True (unused) for http."""
        if not self.https:
            return True
        bundle = self.ca_bundle
        if bundle is None:
            import certifi

            bundle = certifi.where()
        return ssl.create_default_context(cafile=bundle)


def http_environment(api_url: str) -> HttpEnvironment:
    """The proxies and CA bundle the process environment gives `api_url`."""
    proxies: dict[str, str] = {}
    if not is_loopback_host(urlparse(api_url).hostname):
        found = get_environ_proxies(api_url)  # empty when NO_PROXY covers the host
        proxies = {scheme: url for scheme, url in found.items() if scheme in ("http", "https", "all") and url}
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    return HttpEnvironment(api_url, proxies, bundle if api_url.startswith("https:") else None)
