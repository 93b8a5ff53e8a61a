#!/usr/bin/env python3
"""Refuse to start a production stack that points at the bundled Tpaga emulator.

deploy/compose.production.yml runs this once before the migration and the workers. `.env.example` holds the
emulator's URL and keys so that the try-out works after a plain copy; the same copy must not make a production
stack that bills nobody (or, worse, looks healthy while it does). Exits 2 with one line per problem.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY

# The emulator's service in docker-compose.yml, and the container names Compose gives it (project-sandbox-N,
# or project_sandbox_N with Compose v1), all of which resolve on the stack's network.
EMULATOR_SERVICE = "sandbox"
DEMO_KEYS = {DEFAULT_PRIVATE_KEY: "the emulator's private key", DEFAULT_PUBLIC_KEY: "the emulator's public key"}


def _names_the_emulator(host: str) -> bool:
    if host == EMULATOR_SERVICE:
        return True
    for separator in ("-", "_"):
        parts = host.split(separator)
        if len(parts) >= 3 and parts[-2] == EMULATOR_SERVICE and parts[-1].isdigit():
            return True
    return False


def _is_local_address(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def url_problem(url: str) -> str | None:
    """Why TPAGA_API_URL cannot be the production gateway, or None."""
    if not url:
        return "TPAGA_API_URL is empty: set Tpaga's https URL in .env"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.username or parts.password:  # the message goes to the logs: never repeat credentials
        url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    if parts.scheme != "https" or not host:
        return f"TPAGA_API_URL={url} is not an https URL: production talks to Tpaga over https only"
    if _is_local_address(host):
        return f"TPAGA_API_URL={url} is a loopback address (the emulator's try-out URL): set Tpaga's URL in .env"
    if _names_the_emulator(host):
        return f"TPAGA_API_URL={url} names the stack's emulator service ({EMULATOR_SERVICE}): set Tpaga's URL in .env"
    return None


def problems(env: Mapping[str, str]) -> list[str]:
    """Every reason the environment is not a production gateway configuration (empty when it is one)."""
    found = []
    url_issue = url_problem(env.get("TPAGA_API_URL", "").strip())
    if url_issue:
        found.append(url_issue)
    if not env.get("TPAGA_PRIVATE_KEY", "").strip():
        found.append("TPAGA_PRIVATE_KEY is empty: set the private key from Tpaga's dashboard in .env")
    for name in ("TPAGA_PRIVATE_KEY", "TPAGA_PUBLIC_KEY"):
        which = DEMO_KEYS.get(env.get(name, "").strip())
        if which:
            found.append(f"{name} is {which} (from .env.example): set the key from Tpaga's dashboard in .env")
    return found


def main() -> int:
    found = problems(os.environ)
    for problem in found:
        print(f"production check: {problem}", file=sys.stderr)
    if found:
        print("production check: refusing to start; the try-out stack is docker-compose.yml alone", file=sys.stderr)
        return 2
    print("production check: TPAGA_API_URL and the keys are not the emulator's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
