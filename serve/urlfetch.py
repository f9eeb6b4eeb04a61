"""Fetch an image named by URL, for clients that send {"url": ...} (off unless enabled).

A server that fetches URLs for its clients can be made to read internal services (the
instance metadata endpoint, a VPC database). So: http(s) only; the host is resolved once, every
address it resolves to is checked (no loopback, private, link-local, multicast or reserved
address unless allowed) and the connection goes to that checked address, so a DNS answer that
changes between check and connect cannot slip through; no redirects; a size and a time limit.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urlsplit

from .errors import RequestError, bad_request, too_large
from .settings import UrlPolicy

FORBIDDEN = 403
USER_AGENT = "imgcls-serve/1"


def check_address(ip: str, policy: UrlPolicy) -> None:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if policy.allow_private:
        return
    if not addr.is_global or addr.is_multicast:
        kind = "loopback" if addr.is_loopback else "link-local" if addr.is_link_local else "private or reserved"
        raise RequestError(FORBIDDEN, f"The URL resolves to {addr}, a {kind} address, which this endpoint does not "
                                      "fetch from. Send the image bytes instead, or set IMGCLS_URL_ALLOW_PRIVATE=true "
                                      "on the endpoint if it must read from your network.")


def resolve(host: str, port: int, policy: UrlPolicy) -> str:
    """One checked address for host (all of its addresses must pass)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise bad_request(f"The URL's host {host!r} does not resolve ({exc.strerror}).") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for ip in addresses:
        check_address(ip, policy)
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(url: str, policy: UrlPolicy) -> bytes:
    if not policy.enabled:
        raise RequestError(FORBIDDEN, "This endpoint does not fetch URLs: send the image itself (raw bytes, or "
                                      "base64 in {\"image\": ...}). To allow URLs set IMGCLS_URL_FETCH=true on the endpoint.")
    if not isinstance(url, str):
        raise bad_request("\"url\" must be a string.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request(f"Only http and https URLs can be fetched, got {url[:200]!r}.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise bad_request(f"The URL {url[:200]!r} has an invalid port.") from None
    ip = resolve(parts.hostname, port, policy)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + policy.timeout_s
    conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = conn_cls(parts.hostname, port, ip, policy.timeout_s)
    try:
        conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            raise bad_request(f"{url[:200]} redirects (HTTP {resp.status}) to {resp.getheader('Location', '?')[:200]}; "
                              "redirects are not followed: send the final URL.")
        if resp.status != 200:
            raise bad_request(f"Fetching {url[:200]} answered HTTP {resp.status} {resp.reason}.")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise too_large(f"{url[:200]} is {int(length)} bytes, over the limit of {policy.max_bytes} (IMGCLS_URL_MAX_MB).")
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = resp.read1(64 * 1024)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise too_large(f"{url[:200]} is over the limit of {policy.max_bytes} bytes (IMGCLS_URL_MAX_MB).")
            chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise bad_request(f"Fetching {url[:200]} took longer than {policy.timeout_s:g} s (IMGCLS_URL_TIMEOUT_S).") from None
    except RequestError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise bad_request(f"Fetching {url[:200]} failed: {exc}.") from None
    finally:
        conn.close()
