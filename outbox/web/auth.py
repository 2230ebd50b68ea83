"""Who may use `outbox web`, and the tokens that say so: password hashes (scrypt), the users file,
signed session cookies and CSRF tokens. Standard library only; no I/O but reading the files.

A users file has one user per line, `name:role:hash`, role `operator` (may act) or `viewer`
(read-only), the hash made by `outbox web hash-password`; blank lines and `#` comments are
ignored. A session cookie is `sid.user.expiry.signature`, HMAC-SHA256 with the session secret;
the server keeps no session table (a restart with a new secret logs everyone out), only the ids
of sessions logged out before their expiry."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

SESSION_SECONDS = 8 * 3600
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_HASH_PREFIX = "scrypt"
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")


class AuthError(ValueError):
    """A users file, secret file or password that cannot be used: one line saying why."""


class Role(enum.StrEnum):
    OPERATOR = "operator"  # may retry and discard
    VIEWER = "viewer"  # reads only


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role

    @property
    def may_act(self) -> bool:
        return self.role is Role.OPERATOR


# ---- password hashes -------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$16384$8$1$SALT$HASH` (base64url): the parameters travel with the hash."""
    if not password:
        raise AuthError("the password is empty")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, **_SCRYPT)
    n, r, p = _SCRYPT["n"], _SCRYPT["r"], _SCRYPT["p"]
    return f"{_HASH_PREFIX}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def check_hash_format(stored: str) -> None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _HASH_PREFIX or not all(x.isdigit() for x in parts[1:4]):
        raise AuthError("the hash is not one `outbox web hash-password` made")


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches the stored hash (compared in constant time)."""
    try:
        check_hash_format(stored)
        _, n, r, p, salt, expected = stored.split("$")
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=128 * 1024 * 1024,
            dklen=len(_unb64(expected)),
        )
    except (AuthError, ValueError):
        return False
    return hmac.compare_digest(digest, _unb64(expected))


# ---- the users file --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    user: User
    password_hash: str


def parse_users(text: str, source: str) -> dict[str, Account]:
    """The users of a users file by name; AuthError names the line that is wrong (never the
    hash)."""
    users: dict[str, Account] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, stored = rest.partition(":")
        where = f"{source} line {number}"
        if not _NAME.match(name):
            raise AuthError(
                f"{where}: expected name:role:hash with a name of letters, digits, _.@+-"
            )
        if role not in {r.value for r in Role}:
            raise AuthError(f"{where}: the role must be operator or viewer")
        try:
            check_hash_format(stored)
        except AuthError as exc:
            raise AuthError(f"{where}: {exc}") from None
        if name in users:
            raise AuthError(f"{where}: user {name!r} is listed twice")
        users[name] = Account(User(name, Role(role)), stored)
    if not users:
        raise AuthError(f"{source}: no users")
    return users


def read_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthError(f"cannot read the {what} {path}: {exc.strerror}") from None


def load_secret(path: Path | None) -> tuple[bytes, bool]:
    """The session secret from its file (at least 32 characters), or a random one: (secret,
    generated)."""
    if path is None:
        return secrets.token_bytes(32), True
    text = read_file(path, "session secret file").strip()
    if len(text) < 32:
        raise AuthError(f"the session secret in {path} is shorter than 32 characters")
    return text.encode("utf-8"), False


# ---- sessions and CSRF -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    user: str  # "" before login (the login form's own CSRF token needs a session)
    expires: int


@dataclass
class Signer:
    """Signs and reads session cookies and CSRF tokens with one secret."""

    secret: bytes
    revoked: dict[str, int] = field(default_factory=dict)  # sid -> expiry, logged out

    def _mac(self, purpose: str, text: str) -> str:
        return _b64(hmac.new(self.secret, f"{purpose}\n{text}".encode(), "sha256").digest())

    def new_session(self, user: str, now: float | None = None) -> Session:
        expires = int((now or time.time()) + SESSION_SECONDS)
        return Session(secrets.token_urlsafe(18), user, expires)

    def cookie(self, session: Session) -> str:
        body = f"{session.sid}.{_b64(session.user.encode())}.{session.expires}"
        return f"{body}.{self._mac('session', body)}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, if its signature is right and it has not expired."""
        if not cookie or cookie.count(".") != 3:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._mac("session", body)):
            return None
        sid, user, expires = body.split(".")
        try:
            session = Session(sid, _unb64(user).decode("utf-8"), int(expires))
        except ValueError:
            return None
        if session.expires <= (now or time.time()) or sid in self.revoked:
            return None
        return session

    def revoke(self, session: Session) -> None:
        now = time.time()
        self.revoked = {s: e for s, e in self.revoked.items() if e > now}
        self.revoked[session.sid] = session.expires

    def csrf(self, binding: str) -> str:
        """The CSRF token of a session id (or, behind a proxy, of a user)."""
        return self._mac("csrf", binding)

    def csrf_ok(self, binding: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(binding), token or "")

    def password_key(self, user: str, password: str) -> str:
        """A key for a checked (user, password) pair: HTTP Basic checks are cached by it, so
        that a script does not pay for scrypt on every request."""
        return self._mac("basic", f"{user}\n{password}")
