"""introspect: an auth plugin in Python (componentize-py) for opaque access
tokens, checked at an OAuth 2.0 token introspection endpoint (RFC 7662)
through the host (ABI 1.1 `http-fetch`): the host makes the request to a URL
the operator lists, with its timeout, size cap and circuit breaker, and keeps
the answer for `cache_secs` under a key this plugin chooses (a digest of the
token), so a client reconnecting does not ask the provider again.

Terminals connect with `/ws?token=<opaque token>`. A token the endpoint calls
active is accepted as the client its `client_id_claim` names (default `sub`,
a number); an inactive one is denied; a token that looks like a JWT (two dots)
is passed on to the next auth plugin. When the endpoint cannot be reached the
connect is denied, and the reason logged: auth fails closed.

Settings (introspect.toml, [settings]):
- `endpoint`: the introspection URL (its origin listed under `http` for this
  plugin in the node's grants file);
- `client_id`, `client_secret`: this resource server's credentials (HTTP
  Basic, RFC 7662 section 2.1); better read from the environment the operator
  grants: `client_secret_env`;
- `cache_secs` (default 60), `client_id_claim` (default "sub").
"""

import base64
import json
import os
import urllib.parse

from wit_world import exports
from wit_world.exports import auth as hook
from wit_world.imports import host
from componentize_py_types import Err

_settings = None


def settings():
    global _settings
    if _settings is None:
        raw = json.loads(host.config() or "{}")
        if "endpoint" not in raw:
            raise ValueError("introspect needs settings.endpoint")
        secret = raw.get("client_secret")
        if secret is None and "client_secret_env" in raw:
            secret = os.environ.get(raw["client_secret_env"], "")
        raw["basic"] = base64.b64encode(f"{raw.get('client_id', '')}:{secret or ''}".encode()).decode()
        _settings = raw
    return _settings


def introspect(token: str, conf) -> dict:
    digest = host.digest(host.HashAlgorithm.SHA256, token.encode()).hex()
    request = host.HttpRequest(
        method="POST",
        url=conf["endpoint"],
        headers=[
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "application/json"),
            ("authorization", "Basic " + conf["basic"]),
        ],
        body=urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode(),
        timeout_ms=0,
        cache=host.HttpCache(key="introspect:" + digest, ttl_ms=int(conf.get("cache_secs", 60)) * 1000),
    )
    response = host.http_fetch(request)
    if response.status != 200:
        raise ValueError(f"introspection answered {response.status}")
    return json.loads(bytes(response.body))


class Auth(exports.Auth):
    def authenticate(self, request: hook.ConnectRequest) -> hook.Decision:
        token = request.token
        if not token or token.count(".") == 2:
            return hook.Decision_Pass()
        try:
            conf = settings()
            answer = introspect(token, conf)
        except Err as err:
            return hook.Decision_Deny(f"introspection unavailable: {err.value}")
        except ValueError as err:
            return hook.Decision_Deny(f"introspection failed: {err}")
        if answer.get("active") is not True:
            return hook.Decision_Deny("token not active")
        subject = str(answer.get(conf.get("client_id_claim", "sub"), ""))
        if not subject.lstrip("-").isdigit():
            return hook.Decision_Deny("the token's subject is not a client id")
        metadata = answer.get("username")
        return hook.Decision_Allow(hook.Identity(client_id=int(subject), metadata=metadata))
