"""Bearer tokens for ``ocbank serve``: who may change what the line trusts, and who may inspect.

A token is read once, at start, from a file (``--admin-token-file``, ``--inspect-token-file``)
and held as a :class:`Secret`, whose ``repr`` never shows it, so it cannot reach a log
line, an error message or a metric by accident. A request's token is compared in constant
time (:func:`hmac.compare_digest`). A server that listens beyond loopback without an admin
token is refused at start (:func:`check_exposure`), unless ``--allow-unauthenticated`` says so.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import stat
from pathlib import Path

from ..errors import ConfigError
from .api import ApiError

log = logging.getLogger(__name__)

# Shorter tokens can be guessed; a token from `openssl rand -hex 32` has 64 characters.
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("localhost",)


class Secret:
    """A token that never prints: ``repr`` and ``str`` hide it; :meth:`matches` compares in constant time."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value.encode("ascii")

    def matches(self, candidate: str | None) -> bool:
        if candidate is None:
            return False
        try:
            sent = candidate.encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(sent, self._value)

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)

    def __getstate__(self) -> bytes:  # Ray pickles the options for its actors
        return self._value

    def __setstate__(self, state: bytes) -> None:
        self._value = state


def read_token(path: str, option: str) -> Secret:
    """The token in the file ``path`` (surrounding whitespace dropped), or ConfigError naming ``option`` and the fix."""
    file = Path(path)
    if not file.is_file():
        msg = f"{option} {path!r} is not a file. Write a token into it, e.g. `openssl rand -hex 32 > {path}`."
        raise ConfigError(msg)
    try:
        text = file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{option} {path!r} cannot be read as ASCII text ({type(exc).__name__}). Write the token as plain ASCII."
        raise ConfigError(msg) from None
    if len(text) < MIN_TOKEN_CHARS or any(not 33 <= ord(c) <= 126 for c in text):
        msg = (f"{option} {path!r} must hold one token of at least {MIN_TOKEN_CHARS} visible ASCII characters "
               f"(no spaces), got {len(text)} characters. Write one with `openssl rand -hex 32 > {path}`.")
        raise ConfigError(msg)
    mode = file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s can be read by other users (mode %o); restrict it: chmod 600 %s",
                    option, path, stat.S_IMODE(mode), path)
    return Secret(text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (a name other than localhost counts as not)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, admin_token: Secret | None, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond loopback with the admin endpoints open, unless asked for explicitly."""
    if admin_token is None and not is_loopback(host) and not allow_unauthenticated:
        msg = (f"--host {host} accepts connections from other machines, and without --admin-token-file anyone who "
               "can reach the port could reload, teach or roll back the banks. Give --admin-token-file FILE, "
               "or --allow-unauthenticated if the network is trusted.")
        raise ConfigError(msg)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def authorize(header: str | None, allowed: tuple[Secret | None, ...], what: str) -> None:
    """Let a request through when no token guards it, or when it carries one of ``allowed``; else 401.

    ``allowed``: the tokens that open ``what`` (None entries are skipped; none at all: open).
    The message never repeats what was sent.
    """
    tokens = [t for t in allowed if t is not None]
    if not tokens:
        return
    sent = bearer(header)
    # Compare with every token, whichever matches, so the time taken does not say which one was close.
    ok = [t.matches(sent) for t in tokens]
    if not any(ok):
        reason = "no Authorization: Bearer token was sent" if sent is None else "the Bearer token is not accepted"
        msg = f"{what} needs a token and {reason}. Send Authorization: Bearer <token> with the server's token."
        raise ApiError(401, "unauthorized", msg)

