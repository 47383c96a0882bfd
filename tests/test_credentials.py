"""Credentials in URIs: masked in text, split off into MLflow's variables, masked URIs read back."""

from __future__ import annotations

from mlra_mega.credentials import mask, split_credentials, strip_masked


def test_mask_hides_userinfo_and_secret_query_values_only() -> None:
    text = "to http://bob:pw@h:5000/x?run=3&token=abc and sqlite:////tmp/m.db, postgresql://u:p@db/x"
    assert mask(text) == "to http://***@h:5000/x?run=3&token=*** and sqlite:////tmp/m.db, postgresql://***@db/x"
    assert mask("plain words, no uri") == "plain words, no uri"


def test_split_moves_credentials_to_mlflow_variables() -> None:
    clean, env = split_credentials("https://bob:p%40ss@h/?access_token=t&x=1")
    assert clean == "https://h/?x=1"
    assert env == {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "p@ss",
                   "MLFLOW_TRACKING_TOKEN": "t"}
    assert split_credentials("http://h:5000") == ("http://h:5000", {})


def test_a_masked_uri_read_back_carries_nothing() -> None:
    masked = mask("http://bob:pw@h:5000/?token=abc")
    assert split_credentials(masked)[1] == {}
    assert strip_masked(masked) == "http://h:5000/"
