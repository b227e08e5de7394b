"""Credentials in URLs, kept out of what a build records: history, cache keys and records, progress, reports.

Contract: :func:`redact_url` replaces the user info of one URL (``scheme://user:password@host/…``) with
``xxxxx@``; :func:`redact_urls` does it for every URL inside a text (an ``ADD`` line). An SCP-like git address's
user name (``git@host:repo``) is not a secret and is kept. Imports nothing heavy: every build uses it.
"""

from __future__ import annotations

import re
import urllib.parse

_URL_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its user info (``user:password@``) replaced by ``xxxxx@``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.scheme and "@" in parts.netloc:
        return urllib.parse.urlunsplit(parts._replace(netloc="xxxxx@" + parts.netloc.rpartition("@")[2]))
    return url  # no user info, or an SCP-like ssh address whose user name is not a secret


def redact_urls(text: str) -> str:
    """``text`` (an ADD line, say) with the user info of every ``scheme://user:password@host`` in it replaced by
    ``xxxxx``, as :func:`redact_url` does for one URL."""
    return _URL_USERINFO.sub(r"\1xxxxx@", text)
