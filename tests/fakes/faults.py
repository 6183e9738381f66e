"""A seeded random fault mix for the fake provider server (``server.reply_hook``).

    mix = FaultMix(seed=7, rate_limited=0.10, server_error=0.05, invalid_json=0.05, truncated=0.05)
    mix.install(server)

Each request to a chat / generateContent route draws one uniform number from the mix's own
``random.Random(seed)``: below the first share it gets a 429 (``Retry-After: retry_after``), then a
500, an answer that is not JSON, an answer cut at the token limit; otherwise None (the server's
normal answer). The same seed and the same order of requests give the same faults.

Everything drawn is recorded per item (the image name found in the request body, ``item_of``), so
a benchmark can count how many valid answers the server produced for each item: ``answers[item]``
> 1 means the item was paid for again.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter, defaultdict

from fakes.provider_server import FakeProviderServer, RecordedRequest, Reply

_IMAGE = re.compile(r"([A-Za-z0-9_\-]+)\.png")
_CHAT = ("/chat/completions", ":generateContent")


def item_of(request: RecordedRequest) -> str | None:
    """The plan a request is for: the first ``<stem>.png`` of its first user turn (a re-ask quotes
    a broken answer, whose image name may be anything, in later turns)."""
    body = request.body if isinstance(request.body, dict) else {}
    turns = [m for m in body.get("messages") or [] if m.get("role") == "user"] or (body.get("contents") or [])[:1]
    text = json.dumps(turns[0] if turns else body, ensure_ascii=False)
    match = _IMAGE.search(text)
    return match.group(1) if match else None


class FaultMix:
    """Picks a `Reply` per request with fixed shares; thread-safe (the server answers in threads)."""

    KINDS = ("rate_limited", "server_error", "invalid_json", "truncated")

    def __init__(
        self,
        seed: int = 0,
        *,
        rate_limited: float = 0.10,
        server_error: float = 0.05,
        invalid_json: float = 0.05,
        truncated: float = 0.05,
        retry_after: float = 1.0,
    ):
        shares = (rate_limited, server_error, invalid_json, truncated)
        if any(s < 0 for s in shares) or sum(shares) > 1:
            raise ValueError(f"fault shares must be >= 0 and sum to <= 1, got {shares}")
        self.shares = dict(zip(self.KINDS, shares, strict=True))
        self.retry_after = retry_after
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.drawn: Counter[str] = Counter()  # kind (or "ok") → requests
        self.answers: Counter[str] = Counter()  # item → valid answers the server produced
        self.by_item: defaultdict[str, list[str]] = defaultdict(list)  # item → kinds in order

    def install(self, server: FakeProviderServer) -> FaultMix:
        server.reply_hook = self
        return self

    def __call__(self, request: RecordedRequest) -> Reply | None:
        if not request.path.endswith(_CHAT):
            return None
        with self._lock:
            draw = self.rng.random()
            kind = "ok"
            edge = 0.0
            for name in self.KINDS:
                edge += self.shares[name]
                if draw < edge:
                    kind = name
                    break
            item = item_of(request) or "?"
            self.drawn[kind] += 1
            self.by_item[item].append(kind)
            if kind == "ok":
                self.answers[item] += 1
        if kind == "rate_limited":
            return Reply.rate_limited(retry_after=self.retry_after)
        if kind == "server_error":
            return Reply.server_error()
        if kind == "invalid_json":
            return Reply.invalid_json()
        if kind == "truncated":
            return Reply.truncated()
        return None

    @property
    def repaid(self) -> int:
        """Valid answers produced for an item that already had one."""
        return sum(n - 1 for n in self.answers.values() if n > 1)
