"""Masking secrets for display: passwords inside URLs and DSNs, and whole ``SecretStr`` values.

``mask_url("postgresql://app:s3cret@db:5432/arae")`` gives ``postgresql://app:****@db:5432/arae``;
libpq keyword DSNs (``host=db password=s3cret``) and secret-looking query parameters
(``?password=...``, ``?api_key=...``) are masked the same way. ``masked_dump(settings)`` is
``model_dump(mode="json")`` with every secret masked: what ``ft-pipeline config show`` prints.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

MASK = "****"
_SECRET_PARAMS = frozenset(
    {
        "password",
        "pass",
        "passwd",
        "pwd",
        "sslpassword",
        "secret",
        "token",
        "access_token",
        "api_key",
        "apikey",
        "key",
        "x-api-key",
        "auth",
        "signature",
        "x-amz-signature",
    }
)
_KEYWORD_DSN = re.compile(r"(?i)\b(password|sslpassword)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def mask_url(text: str) -> str:
    """``text`` with the password of a URL (``scheme://user:pw@host``), secret query parameters,
    and ``password=`` of a libpq keyword DSN replaced by ``****``. Other text is returned as is."""
    if not isinstance(text, str) or not text:
        return text
    if "://" not in text:
        return _KEYWORD_DSN.sub(lambda m: f"{m.group(1)}={MASK}", text)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
    except ValueError:
        return _mask_userinfo_loosely(text)
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}"
        elif userinfo and parts.scheme in ("http", "https", "ws", "wss"):
            netloc = f"{MASK}@{hostport}"  # a bare token as the user name (https://TOKEN@host)
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()]+")


def mask_urls_in(text: str) -> str:
    """Free text (an error message, a log line) with every URL in it passed through `mask_url`
    and every libpq ``password=`` masked: what goes into exception messages and logs."""
    if not isinstance(text, str) or not text:
        return text
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    return _KEYWORD_DSN.sub(lambda m: f"{m.group(1)}={MASK}", text)


def _mask_userinfo_loosely(text: str) -> str:
    # Not parseable as a URL (e.g. a bad port): still never show what sits between ':' and '@'.
    return re.sub(r"(://[^:/@\s]*):[^@\s]*@", rf"\1:{MASK}@", text)


def mask_secret(value: SecretStr | str | None) -> str | None:
    """A secret for display: a URL/DSN keeps everything but its password; anything else is ``****``."""
    if value is None:
        return None
    raw = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    if not raw:
        return ""
    if "://" in raw or _KEYWORD_DSN.search(raw):
        return mask_url(raw)  # a DSN: where it points stays readable, its password does not
    return MASK


def _walk(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _walk(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, SecretStr):
        return mask_secret(value)
    if isinstance(value, dict):
        return {k: _walk(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(v) for v in value]
    if isinstance(value, str):
        return mask_url(value)
    return value


def masked_dump(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` with every ``SecretStr`` and every password inside a URL or
    DSN masked."""
    from pydantic import TypeAdapter

    masked = _walk(model)
    return TypeAdapter(Any).dump_python(masked, mode="json")
