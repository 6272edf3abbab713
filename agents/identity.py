"""Who may call the agent's Control service: an allow-list of client certificate SANs.

Mutual TLS proves only that a client's certificate chains to the CA; in a cluster that CA
often signs every workload's certificate (cert-manager, a mesh), so the chain alone would let
any pod cap the node's power. Control therefore also requires the certificate to carry one of
the allowed subject alternative names, typically the operator's ServiceAccount identity
`spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (a URI SAN) or a DNS SAN.

An entry with `://` is a URI SAN, anything else a DNS SAN; both compare exactly (DNS names
without regard to case). The certificate's common name is never an identity (RFC 6125), and
wildcard entries are refused: an allow-list names identities, not patterns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# RFC 3986 scheme, then an authority or path: no whitespace, no commas (the flag's separator).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s,*]+")
# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_DNS_MAX_LENGTH = 253

# gRPC's auth-context properties for the peer certificate's SANs, by SAN type.
URI_PROPERTY = "peer_uri"
DNS_PROPERTY = "peer_dns"

AuthContext = Mapping[str, Iterable[bytes]]


def parse_san(entry: str) -> tuple[str, str]:
    """(property, value) for one allow-list entry; ValueError naming it if it is no SAN."""
    text = entry.strip()
    if "://" in text:
        if not _URI.fullmatch(text):
            raise ValueError(
                f"{entry!r} is not a URI SAN (scheme://..., no spaces, commas or wildcards)"
            )
        return URI_PROPERTY, text
    if not text or len(text) > _DNS_MAX_LENGTH or not _DNS.fullmatch(text):
        raise ValueError(
            f"{entry!r} is neither a URI SAN (scheme://...) nor a DNS name "
            f"(letters, digits, '-' and '.', at most {_DNS_MAX_LENGTH} characters, no wildcards)"
        )
    return DNS_PROPERTY, text.lower()


def _peer_sans(auth_context: AuthContext) -> set[tuple[str, str]]:
    sans = {(URI_PROPERTY, v.decode()) for v in auth_context.get(URI_PROPERTY, ())}
    sans |= {(DNS_PROPERTY, v.decode().lower()) for v in auth_context.get(DNS_PROPERTY, ())}
    return sans


@dataclass(frozen=True)
class AllowedSans:
    """The client identities Control admits; never empty (that would admit nobody, silently)."""

    entries: frozenset[tuple[str, str]]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowedSans:
        parsed = frozenset(parse_san(entry) for entry in entries)
        if not parsed:
            raise ValueError("Control needs at least one allowed client SAN")
        return cls(parsed)

    def admits(self, auth_context: AuthContext) -> bool:
        return bool(self.entries & _peer_sans(auth_context))

    def names(self) -> Sequence[str]:
        return sorted(value for _, value in self.entries)


def describe_peer(auth_context: AuthContext) -> str:
    """The peer certificate's SANs (or its subject when it has none), for a log line."""
    sans = sorted(value for _, value in _peer_sans(auth_context))
    if sans:
        return "SANs " + ", ".join(sans)
    subject = b", ".join(auth_context.get("x509_subject", ())).decode() or "unknown"
    return f"no URI or DNS SAN (subject {subject})"
