"""Credentials in URIs: masked wherever we write or print them, moved to MLflow's variables for jobs.

A tracking URI may carry a secret (`http://user:password@host`, `...?token=T`). The run keeps the
URI as given in memory, to connect with; everything written or printed (config.yaml, the
checkpoint sidecar, MLflow params, logs, error messages, the rendered batch script) goes through
`mask`. A batch script gets the URI without its credentials, and the credentials travel in
MLflow's own variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN) in sbatch's environment,
which sbatch hands to the job; those variables are also what users should set in the first place.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "mask", "split_credentials", "strip_masked"]

MASK = "***"
_SECRET_PARAMS = ("token", "access_token", "api_key", "apikey", "password", "secret", "key", "sig")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_QUERY = re.compile(r"(?P<name>[?&](?:" + "|".join(_SECRET_PARAMS) + r")=)(?P<value>[^&\s'\"#]+)", re.IGNORECASE)


def mask(text: str) -> str:
    """`text` with every URI's user:password and secret query values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['name']}{MASK}", text)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without credentials, MLflow's variables that carry them)."""
    parts = urlsplit(uri)
    env: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = (unquote(part) for part in userinfo.partition(":"))
        if user and user != MASK:  # a masked URI carries nothing: the variables already hold it
            env["MLFLOW_TRACKING_USERNAME"] = user
        if password and password != MASK:
            env["MLFLOW_TRACKING_PASSWORD"] = password
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in _SECRET_PARAMS:
            if value != MASK:
                env["MLFLOW_TRACKING_TOKEN"] = value
        else:
            query.append((name, value))
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment)), env


def strip_masked(uri: str) -> str:
    """A URI read back from a file we wrote (masked) without the *** parts: the credentials then
    come from MLflow's variables."""
    clean, _ = split_credentials(uri)
    return clean
