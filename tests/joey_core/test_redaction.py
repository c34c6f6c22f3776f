"""Secrets stay out of settings' reprs, validation errors and every log line, tracebacks included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from joey_core import redaction
from joey_core.settings import DatabaseSettings

DB_PASSWORD = "db-pa55word"
SASL_PASSWORD = "sasl-pa55word"
SECRET_ENV = {
    "JOEY_DATABASE_URL": f"postgresql://joey:{DB_PASSWORD}@db.example.com:5432/joey",
    "JOEY_REDIS_URL": "redis://:redis-pa55word@127.0.0.1:6379/0",
    "JOEY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "JOEY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "JOEY_KAFKA_SASL_USERNAME": "joey",
    "JOEY_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    "JOEY_KAFKA_CONFIG": '{"ssl.key.password": "key-pa55word", "linger.ms": 5}',
}


def _settings(monkeypatch: pytest.MonkeyPatch) -> DatabaseSettings:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    return DatabaseSettings()


def test_settings_show_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch)
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "pa55word" not in shown
    assert settings.database_url.get_secret_value() == SECRET_ENV["JOEY_DATABASE_URL"]


def test_a_refused_setting_does_not_quote_the_secrets_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOEY_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("JOEY_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("JOEY_DATABASE_URL", SECRET_ENV["JOEY_DATABASE_URL"])
    with pytest.raises(ValidationError) as refused:
        DatabaseSettings()
    assert "JOEY_KAFKA_SASL_PASSWORD set" in str(refused.value) and "pa55word" not in str(refused.value)


def test_the_secrets_of_settings_are_passwords_not_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(redaction.secrets_of(_settings(monkeypatch))) == {
        DB_PASSWORD,
        "redis-pa55word",
        SASL_PASSWORD,
        "key-pa55word",
    }
    assert redaction.url(SECRET_ENV["JOEY_DATABASE_URL"]) == "postgresql://joey:***@db.example.com:5432/joey"
    assert redaction.url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_no_log_line_or_uncaught_traceback_of_a_service_shows_a_secret() -> None:
    # A service's start, as every serve() does it, logging what a careless library could.
    program = """
import logging, threading
from joey_core.lifecycle import configure_logging
from joey_core.settings import DatabaseSettings
settings = DatabaseSettings()
configure_logging(settings)
url = settings.database_url.get_secret_value()
sasl = settings.kafka_sasl_password.get_secret_value()
logging.getLogger("somelib").warning("connecting to %s with %s", url, sasl)
try:
    raise ConnectionError(f"cannot connect to {url}")
except ConnectionError:
    logging.getLogger("somelib").exception("failed")
thread = threading.Thread(target=lambda: 1 / 0 if url else None, name="worker")
thread.start(); thread.join()
raise RuntimeError(f"gave up on {url}")
"""
    run = subprocess.run(
        [sys.executable, "-c", program],
        env=os.environ | SECRET_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1
    assert "connecting to postgresql://joey:***@db.example.com:5432/joey with ***" in output
    assert "ConnectionError: cannot connect to postgresql://joey:***@db.example.com" in output
    assert "uncaught exception in thread worker" in output and "ZeroDivisionError" in output
    assert "RuntimeError: gave up on postgresql://joey:***@" in output
    assert "pa55word" not in output
