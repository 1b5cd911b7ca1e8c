"""Hooks for the schemathesis run of tests/tests/openapi.rs: what the OpenAPI document says
in words but a schema cannot, and live console sessions. Each edits a request just before it
is sent (schemathesis then judges the request as sent); nothing else is touched.
"""

import os
import re
from datetime import datetime, timedelta, timezone

import requests
import schemathesis

LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def _time(value):
    try:
        t = datetime.fromisoformat(value)
        return t.astimezone(timezone.utc) if t.tzinfo else None
    except (ValueError, OverflowError):
        return None


@schemathesis.hook("before_call")
def expiry_ahead(context, case, kwargs):
    """`expires_at` must be a time in the future (and at most 9999-12-31T23:59:59Z): the
    server refuses any other with a 400, as the field's description says. A `date-time`
    format cannot carry that bound, and schemathesis draws times from anywhere (and reuses
    the server's own `created_at`, which has passed). A well-formed time outside that window
    becomes one a day ahead; malformed ones go out as generated."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("expires_at"), str):
        return
    t = _time(body["expires_at"])
    now = datetime.now(timezone.utc)
    if t is not None and not now + timedelta(minutes=1) < t <= LATEST:
        ahead = (now + timedelta(days=1)).replace(microsecond=0)
        body["expires_at"] = ahead.isoformat().replace("+00:00", "Z")


@schemathesis.hook("before_call")
def sign_in_with_the_example(context, case, kwargs):
    """The sign-in's documented example stands for the admin credential, so that a case
    signs in for real (every generated credential is, rightly, a 401)."""
    if case.operation.label != "POST /v1/session" or not isinstance(case.body, dict):
        return
    schemas = case.operation.schema.raw_schema["components"]["schemas"]
    if case.body.get("credential") == schemas["SignIn"]["examples"][0]["credential"]:
        case.body["credential"] = os.environ["TG_ADMIN"]


def _sign_in(case):
    url = case.operation.schema.get_base_url().rstrip("/") + "/v1/session"
    r = requests.post(url, json={"credential": os.environ["TG_ADMIN"]}, timeout=30)
    r.raise_for_status()
    return r.cookies["tokengate_session"], r.json()["csrf_token"]


@schemathesis.hook("before_call")
def fresh_console_session(context, case, kwargs):
    """The console session of schemathesis.toml stands for "a live session": a request that
    carries it gets a session of its own, signed in just before. One session for the whole
    run would end at the first sign-out the run makes, and leave every later session call a
    401 that tests nothing. Requests without it, or with a made-up one (the credential
    checks), go out as they are."""
    cookies, headers = case.cookies or {}, case.headers or {}
    if cookies.get("tokengate_session") != os.environ["TG_SESSION"]:
        return
    cookie, csrf = _sign_in(case)
    case.cookies = {**cookies, "tokengate_session": cookie}
    if headers.get("X-CSRF-Token") == os.environ["TG_CSRF"]:
        case.headers = {**headers, "X-CSRF-Token": csrf}


SCOPE_NAME = re.compile(r"^[a-z0-9][a-z0-9:._-]{0,63}$")


@schemathesis.hook("before_call")
def scopes_exist(context, case, kwargs):
    """A token's `scopes` must name existing scopes: the server refuses any other name with a
    400, as the field's description says, and no schema can know which exist. Each name a
    generated token body gives (that could be a scope's) is created first, so that the case
    tests what it was generated to test; the body goes out as generated."""
    if case.operation.label not in ("POST /v1/tokens", "PATCH /v1/tokens/{id}"):
        return
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("scopes"), list):
        return
    url = case.operation.schema.get_base_url().rstrip("/") + "/v1/scopes"
    auth = {"Authorization": "Bearer " + os.environ["TG_ADMIN"]}
    for name in body["scopes"]:
        if isinstance(name, str) and SCOPE_NAME.fullmatch(name):
            # 201, or 409 when it exists already: either way it is there.
            requests.post(url, json={"name": name, "rules": [{"path": "/"}]}, headers=auth, timeout=30)
