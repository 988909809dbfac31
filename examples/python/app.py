"""A Starlette app whose middleware checks a pg_keel rate limit and a pg_keel session on every
request.

    DATABASE_URL=postgresql://app@db/app uvicorn app:app

* Rate limit: ``keel.check(policy, key)`` under a memory-mode policy (shared memory, no WAL on
  the request path). A denial answers 429 with ``Retry-After`` (whole seconds, never early) and
  the ``RateLimit-Policy`` / ``RateLimit`` fields of the IETF draft
  (draft-ietf-httpapi-ratelimit-headers), as ``keel.rate_limit_headers`` writes them for the
  decision; allowed answers carry the same fields.
* Session: the ``session`` cookie's token goes to ``keel.session_validate`` (one index probe);
  an unknown, expired, idle-expired or revoked token is simply no session. ``/login`` creates
  one (and rotates an existing one, against session fixation), ``/logout`` revokes it.

The policy is created once by an admin, for example:
``SELECT keel.create_limit('api', 100, '1 minute', durability => 'memory');``
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import asynccontextmanager

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DSN = os.environ.get("DATABASE_URL", "")
POLICY = os.environ.get("RATE_POLICY", "api")
COOKIE = "session"
# Cookies marked Secure are not sent over plain http: on for any real deployment.
SECURE_COOKIE = os.environ.get("SESSION_COOKIE_SECURE", "1") != "0"


def rate_key(user_id: str) -> str:
    """A user's key, short enough for any policy: keys over 192 bytes leave shared memory
    for the durable path, and over 1,024 are refused."""
    if len(user_id.encode()) <= 128:
        return f"user:{user_id}"
    return "user-sha256:" + hashlib.sha256(user_id.encode()).hexdigest()


class KeelMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        pool: AsyncConnectionPool = request.app.state.pool
        token = request.cookies.get(COOKIE)
        async with pool.connection() as conn:
            session = None
            if token:
                cur = await conn.execute(
                    "SELECT session_id, user_id, data FROM keel.session_validate(%s)", (token,)
                )
                session = await cur.fetchone()
            # Signed-in users are limited per user, anonymous ones per client address (behind a
            # proxy, run uvicorn with --proxy-headers so this is the client's).
            key = rate_key(session[1]) if session else f"ip:{getattr(request.client, 'host', '-')}"
            # The decision and its header values in one statement (keel.rate_limit_headers
            # knows the policy's quota and window, and rounds Retry-After up).
            cur = await conn.execute(
                "SELECT d.allowed, h.ratelimit_policy, h.ratelimit, h.retry_after"
                "  FROM keel.check(%s, %s) d,"
                "       keel.rate_limit_headers(%s, d.remaining, d.reset_after_ms,"
                "                               d.retry_after_ms) h",
                (POLICY, key, POLICY),
            )
            allowed, policy_field, state_field, retry_after = await cur.fetchone()
        fields = {"RateLimit-Policy": policy_field, "RateLimit": state_field}
        if not allowed:
            fields["Retry-After"] = str(retry_after)
            return JSONResponse({"error": "rate limited"}, status_code=429, headers=fields)
        request.state.session = session
        request.state.token = token if session else None
        response = await call_next(request)
        response.headers.update(fields)
        return response


def require_session(request: Request) -> tuple | None:
    return request.state.session


async def login(request: Request) -> Response:
    # JSON only (a form or text/plain body would allow login CSRF), and small.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return JSONResponse({"error": "send JSON"}, status_code=415)
    raw = await request.body()
    if len(raw) > 16_384:
        return JSONResponse({"error": "too large"}, status_code=413)
    try:
        body = json.loads(raw)
    except ValueError:
        return JSONResponse({"error": "not JSON"}, status_code=400)
    user = body.get("user") if isinstance(body, dict) else None
    if not isinstance(user, str) or not user or len(user) > 1024:
        return JSONResponse({"error": "user required"}, status_code=400)
    # A real app checks the password here.
    async with request.app.state.pool.connection() as conn:
        if request.state.token:
            # Never keep a pre-login token: revoke it (session fixation).
            await conn.execute("SELECT keel.session_revoke(%s)", (request.state.token,))
        cur = await conn.execute(
            "SELECT session_id, token, expires_at FROM keel.session_create(%s, ttl => '7 days',"
            " idle_timeout => '2 hours')",
            (user,),
        )
        session_id, token, expires_at = await cur.fetchone()
    response = JSONResponse({"session_id": str(session_id)})
    response.set_cookie(
        COOKIE, token, max_age=7 * 86400, httponly=True, secure=SECURE_COOKIE, samesite="lax"
    )
    return response


async def logout(request: Request) -> Response:
    if request.state.token:
        async with request.app.state.pool.connection() as conn:
            await conn.execute("SELECT keel.session_revoke(%s)", (request.state.token,))
    response = JSONResponse({"ok": True})
    response.delete_cookie(COOKIE)
    return response


async def me(request: Request) -> Response:
    session = require_session(request)
    if session is None:
        return JSONResponse({"error": "not signed in"}, status_code=401)
    session_id, user_id, data = session
    return JSONResponse({"session_id": str(session_id), "user_id": user_id, "data": data})


async def health(_: Request) -> Response:
    return JSONResponse({"ok": True})


@asynccontextmanager
async def lifespan(app: Starlette):
    # prepare_threshold=None keeps the pool usable behind PgBouncer's transaction pooling.
    pool = AsyncConnectionPool(
        DSN,
        min_size=1,
        max_size=int(os.environ.get("DB_POOL_SIZE", "10")),
        kwargs={"autocommit": True, "prepare_threshold": None},
        open=False,
    )
    await pool.open(wait=True, timeout=10)
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


app = Starlette(
    routes=[
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/me", me),
        Route("/health", health),
    ],
    middleware=[Middleware(KeelMiddleware)],
    lifespan=lifespan,
)
