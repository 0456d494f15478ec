"""API keys: plain development keys and hashed production keys, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from infra.settings import Settings, split_list


def key_hashes(settings: Settings) -> dict[str, str]:
    """sha256(key) -> tenant. Plain keys are hashed here and never kept."""
    table: dict[str, str] = {}
    for pair in split_list(settings.api_keys):
        tenant, sep, key = pair.partition(":")
        if not sep or not tenant or not key:
            raise ValueError("LINEARIZE_API_KEYS wants comma-separated tenant:key pairs")
        table[hash_key(key)] = tenant
    if settings.api_keys_file is not None:
        for line in settings.api_keys_file.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tenant, _, digest = line.partition(":")
                table[digest.strip().lower()] = tenant.strip()
    return table


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def tenant_for_key(table: dict[str, str], key: str) -> str | None:
    digest = hash_key(key)
    # Compare against every entry so the time taken does not reveal a matching prefix.
    found = None
    for stored, tenant in table.items():
        if hmac.compare_digest(stored, digest):
            found = tenant
    return found
