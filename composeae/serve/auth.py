"""Credentials of the search service: one bearer token, where it comes from, who may go without.

- `composeae serve --token-file F` reads the token from a file; a Serve config (cluster/serve.yaml,
  KubeRay) names an environment variable (`COMPOSEAE_SERVE_TOKEN` by default) that the nodes
  get from a secret. Either way the deployment is given only the token's sha256 (`Access`): the
  token itself is in no deployment argument, config or log.
- Every endpoint but the health check wants `Authorization: Bearer <token>`; the page (`GET /`)
  also takes `?token=` so a browser can open it, and its script then sends the header itself.
- Serving without a token (`--insecure`) is allowed only when asked for by name, and the
  command line refuses to bind anything but loopback without a token unless it is.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass

from composeae.errors import UserError

TOKEN_ENV = "COMPOSEAE_SERVE_TOKEN"
"""The environment variable a Serve config's replicas read the token from (by default)."""
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
"""A token: at least 16 characters of the URL- and header-safe set (`openssl rand -hex 32`)."""


def check_token(token: str, source: str) -> str:
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise UserError(f"the token in {source} must be 16 to 512 characters of letters, digits "
                        f"and ._~+/=- (e.g. `openssl rand -hex 32 > token`)")
    return token


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return check_token(f.read(), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --token-file {path}: "
                        f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None


def token_from_env(name: str = TOKEN_ENV) -> str | None:
    value = os.environ.get(name)
    return check_token(value, f"${name}") if value else None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Access:
    """Who may call: holders of the token whose sha256 is `token_sha256`; everyone when None
    (only ever by an explicit `--insecure`)."""
    token_sha256: str | None

    @property
    def open(self) -> bool:
        return self.token_sha256 is None

    def allows(self, authorization: str | None, query_token: str | None = None) -> bool:
        if self.token_sha256 is None:
            return True
        presented = None
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = value.strip()
        if presented is None:
            presented = query_token
        if not presented:
            return False
        return hmac.compare_digest(digest(presented), self.token_sha256)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_token: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without a token unless `insecure` says so."""
    if not has_token and not insecure and not is_loopback(host):
        raise UserError(f"refusing to serve {host} without a token: anyone who can reach it "
                        f"could search and read /status; give --token-file FILE, or --insecure "
                        f"to serve it open on purpose")
