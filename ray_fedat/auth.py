"""Joining a Ray cluster that wants a token, and saying clearly why a join failed.

The cluster scripts turn on Ray's token authentication. A client without the token gets a
generic "failed to connect" from `ray.init` after ~20 s of retries, which reads like an
unreachable cluster. So before `ray.init` we (1) use the token this machine has when the
user set no RAY_AUTH_MODE (a token-mode client also joins a cluster without auth), and
(2) probe the address: a TCP connect tells "unreachable" apart, and a GCS client call
raises Ray's AuthenticationError within a second when the token is missing or wrong.
"""
from __future__ import annotations

import os
import socket
from typing import Optional, Tuple

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
MODE_ENV = "RAY_AUTH_MODE"


def default_token_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def token_source(environ=os.environ) -> Optional[str]:
    """Where this machine's token comes from (a description), or None if it has none."""
    if environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}"
    path = environ.get(TOKEN_PATH_ENV) or default_token_path()
    return path if os.path.isfile(path) and os.path.getsize(path) > 0 else None


def use_token_if_available(environ=os.environ) -> Optional[str]:
    """Turn on token mode for this process (and the Ray processes it starts) when the user
    left RAY_AUTH_MODE unset and a token is at hand; returns the token's source."""
    source = token_source(environ)
    if source is not None and MODE_ENV not in environ:
        environ[MODE_ENV] = "token"
        try:  # Ray caches its config at import: refresh it, as Ray itself does when it turns token mode on
            from ray._raylet import Config

            Config.initialize("")
        except ImportError:
            pass
    return source


def authentication_error() -> type:
    """Ray's AuthenticationError. It came with token authentication (Ray 2.52); an older Ray
    has no tokens to refuse, so nothing raised can be one (a class nothing raises)."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        class NoTokenAuthentication(Exception):
            """Stands for AuthenticationError on a Ray without token authentication."""

        return NoTokenAuthentication
    return AuthenticationError


def split_address(address: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a plain GCS address HOST:PORT; None for 'auto', ray://, etc."""
    if "://" in address or address in ("auto", "local"):
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_cluster_access(address: str, timeout_s: float = 10.0) -> Optional[str]:
    """None if `address` answers and accepts this machine's credentials, else a one-line reason."""
    hostport = split_address(address)
    if hostport is None:
        return None
    try:
        socket.create_connection(hostport, timeout=timeout_s).close()
    except OSError as e:
        return (f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one with `ray start --head` "
                "(or cluster/start-head.sh) on the head node, or omit --address/RAY_ADDRESS to run on a local Ray")
    from ray._raylet import GcsClient

    try:
        GcsClient(address=address).internal_kv_get(b"ray_fedat_probe", None, timeout=timeout_s)
    except authentication_error():
        source = token_source()
        if source is None or os.environ.get(MODE_ENV, "").lower() == "disabled":
            return (f"the Ray cluster at {address} requires its authentication token: copy the head's token file "
                    f"(cluster/start-head.sh printed its path) to {default_token_path()}, or set {TOKEN_PATH_ENV}=FILE "
                    f"or {TOKEN_ENV}")
        return (f"the Ray cluster at {address} refused the token from {source}: it is not the head's token "
                f"(copy the head's token file here, or set {TOKEN_PATH_ENV} to it)")
    except Exception:  # noqa: BLE001 - anything else: let ray.init try and report
        return None
    return None
