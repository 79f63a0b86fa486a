"""Settings: every process checks its settings at start and refuses a bad one with one line naming it;
only values are checked, so every process starts while PostgreSQL or Redis is down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from app import create_app
from config import SETTINGS, SettingsError, check_settings
from tests.conftest import ROOT, TEST_DATABASE_URL, TEST_OVERRIDES, TEST_REDIS_URL
from tests.helpers import free_port, procfile_command

CLOSED = "127.0.0.1:1"  # nothing listens there


def environment(**settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS",)}
    env.update(DATABASE_URL=TEST_DATABASE_URL, REDIS_URL=TEST_REDIS_URL, API_KEYS="k", LOG_LEVEL="WARNING")
    env.update(settings)
    return env


def loaded(**environ) -> dict:
    return {s.config_key: s.load(environ) for s in SETTINGS} | {"QUEUES": ["campaign_control", "campaign_sends"]}


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SMS_PROVIDER", "nexmo", "must be one of mock, africastalking, twilio"),
        ("WHATSAPP_PROVIDER", "twilio", "must be one of mock, whatsapp_cloud"),
        ("PUBLIC_BASE_URL", "example.com/hooks", "http:// or https://"),
        ("RETRY_INTERVALS", "10,x", "whole numbers of seconds"),
        ("RETRY_INTERVALS", "-5", "whole numbers of seconds"),
        ("JOB_TIMEOUT", "0", "at least 1"),
        ("JOB_TIMEOUT", "sixty", "whole number"),
        ("MOCK_SENDER_FAILURE_RATE", "1.5", "between 0"),
        ("MOCK_SENDER_FAILURE_RATE", "nan", "between 0"),
        ("API_RATE_LIMIT", "lots", "a rate such as"),
        ("SMS_RATE_LIMIT", "fast", "a rate such as '100/second'"),
        ("SMS_RATE_LIMIT", "0/second", "at least 1 request"),
        ("WHATSAPP_RATE_LIMIT", "80 a second", "a rate such as '100/second'"),
        ("LOG_LEVEL", "LOUD", "must be one of"),
        ("DEFAULT_PHONE_REGION", "XX", "region code"),
        ("REDIS_URL", "http://127.0.0.1:6379", "redis://"),
        ("DATABASE_URL", "mysql://127.0.0.1/db", "postgresql://"),
        ("SEND_QUEUE", "a queue", "letters, digits"),
        ("DATABASE_POOL_SIZE", "8", "below WEB_THREADS (16)"),
        ("SEND_WINDOW", "0", "must be between 1 and 100000"),
        ("RETRY_UNKNOWN", "maybe", "must be true or false"),
        ("WORKER_CONCURRENCY", "0", "between 1 and 256"),
        ("PROVIDER_MAX_CONNECTIONS", "10", "below WORKER_CONCURRENCY (24)"),
        ("SMS_SEGMENT_PRICE", "cheap", "a decimal number such as 0.8"),
        ("SMS_SEGMENT_PRICE", "-0.5", "0 or more"),
        ("SMS_SEGMENT_PRICE", "NaN", "0 or more"),
        ("CURRENCY", "shilling", "ISO 4217"),
        ("CURRENCY", "K3S", "ISO 4217"),
        ("QUIET_HOURS", "20:00", "such as 20:00-08:00"),
        ("QUIET_HOURS", "8pm-8am", "such as 20:00-08:00"),
        ("QUIET_HOURS", "24:00-08:00", "such as 20:00-08:00"),
        ("QUIET_HOURS", "20:60-08:00", "such as 20:00-08:00"),
        ("QUIET_HOURS", "20:00-20:00", "start and end differ"),
        ("DEFAULT_TIMEZONE", "Mars/Olympus", "IANA time zone"),
        ("DEFAULT_TIMEZONE", "../etc/passwd", "IANA time zone"),
        ("SECRET_KEY", "short", "at least 32 characters"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(name, value, says):
    with pytest.raises(SettingsError) as refused:
        check_settings(loaded(**{name: value}))
    assert str(refused.value).startswith(f"{name}: ")
    assert says in str(refused.value)


def test_segment_price_and_currency_are_set_both_or_neither():
    with pytest.raises(SettingsError, match=r"^CURRENCY: required when SMS_SEGMENT_PRICE is set"):
        check_settings(loaded(SMS_SEGMENT_PRICE="0.8"))
    with pytest.raises(SettingsError, match=r"^SMS_SEGMENT_PRICE: required when CURRENCY is set"):
        check_settings(loaded(CURRENCY="KES"))
    both = loaded(SMS_SEGMENT_PRICE="0.80", CURRENCY="kes")
    check_settings(both)
    assert (both["SMS_SEGMENT_PRICE"], both["CURRENCY"]) == (Decimal("0.80"), "KES")
    assert (loaded()["SMS_SEGMENT_PRICE"], loaded()["CURRENCY"]) == (None, None)


def test_queues_must_name_the_send_or_control_queue():
    with pytest.raises(SettingsError, match="QUEUES: sends is neither"):
        check_settings(loaded() | {"QUEUES": ["campaign_control", "sends"]})


def test_secret_values_are_never_shown():
    with pytest.raises(SettingsError) as refused:
        check_settings(loaded(DATABASE_URL="mysql://app:s3cret-pw@db.example.com/prod"))
    assert "s3cret-pw" not in str(refused.value) and "db.example.com" not in str(refused.value)


def test_defaults_are_valid_and_an_app_with_an_invalid_override_is_not_built():
    check_settings(loaded())
    with pytest.raises(SettingsError, match="RETRY_INTERVALS"):
        create_app(
            "config.Config", {**TEST_OVERRIDES, "RETRY_INTERVALS": loaded(RETRY_INTERVALS="x")["RETRY_INTERVALS"]}
        )


@pytest.mark.parametrize(
    ("provider", "missing"),
    [
        ("twilio", ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM", "PUBLIC_BASE_URL"]),
        ("whatsapp_cloud", ["WHATSAPP_ACCESS_TOKEN", "WHATSAPP_PHONE_NUMBER_ID", "WHATSAPP_APP_SECRET",
                            "WHATSAPP_VERIFY_TOKEN"]),
        ("africastalking", ["AFRICASTALKING_USERNAME", "AFRICASTALKING_API_KEY", "WEBHOOK_TOKEN"]),
    ],
)  # fmt: skip
def test_a_provider_missing_several_settings_names_them_all_at_once(provider, missing):
    channel = "WHATSAPP_PROVIDER" if provider == "whatsapp_cloud" else "SMS_PROVIDER"
    with pytest.raises(SettingsError) as refused:
        check_settings(loaded(**{channel: provider}))
    named = [problem.split(":", 1)[0] for problem in str(refused.value).split("; ")]
    assert named == missing
    assert "\n" not in str(refused.value)


def test_bad_values_and_settings_that_do_not_fit_are_reported_together():
    with pytest.raises(SettingsError) as refused:
        check_settings(
            loaded(
                JOB_TIMEOUT="sixty",
                LOG_LEVEL="LOUD",
                SMS_PROVIDER="twilio",
                DATABASE_POOL_SIZE="8",
                TWILIO_ACCOUNT_SID="AC1",
                TWILIO_AUTH_TOKEN="t",
                TWILIO_FROM="+15550000000",
            )
        )
    message = str(refused.value)
    for name in (
        "JOB_TIMEOUT: must be a whole number",
        "LOG_LEVEL: must be one of",
        "PUBLIC_BASE_URL: required",
        "DATABASE_POOL_SIZE: 8 is below WEB_THREADS",
    ):
        assert name in message
    assert "PROVIDER_READ_TIMEOUT" not in message  # compared only with a JOB_TIMEOUT that parsed


PROCESSES = {
    "worker": [sys.executable, "worker.py"],
    "scheduler": [sys.executable, "-m", "flask", "--app", "wsgi", "scheduler"],
    # The Procfile's web, as written there (`gunicorn` beside this Python).
    "web": ["bash", "-c", "exec " + procfile_command("web")],
}


@pytest.mark.parametrize("process", PROCESSES)
def test_every_process_names_every_missing_provider_setting_in_one_start(process):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = environment(WHATSAPP_PROVIDER="whatsapp_cloud", PORT=str(free_port()), PATH=path)
    for name in ("WHATSAPP_ACCESS_TOKEN", "WHATSAPP_PHONE_NUMBER_ID", "WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"):
        env.pop(name, None)
    result = subprocess.run(PROCESSES[process], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1
    for name in ("WHATSAPP_ACCESS_TOKEN", "WHATSAPP_PHONE_NUMBER_ID", "WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"):
        assert f"{name}: required by the whatsapp_cloud provider" in errors[0]


@pytest.mark.parametrize("process", PROCESSES)
def test_every_process_refuses_to_start_with_a_bad_setting_in_one_line(process):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        PROCESSES[process],
        cwd=ROOT,
        env=environment(SMS_PROVIDER="nexmo", PORT=str(free_port()), PATH=path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert errors and errors[0] == (
        "configuration error: SMS_PROVIDER: must be one of mock, africastalking, twilio (got 'nexmo')"
    )
    assert "Traceback" not in result.stderr


def test_web_starts_while_the_database_is_down(tmp_path):
    """No API_KEYS and no database to count stored keys in: the web starts (and answers 503 until the
    database is back) instead of refusing as if no key existed."""
    env = environment(DATABASE_URL=f"postgresql://postgres@{CLOSED}/nowhere")
    del env["API_KEYS"]
    result = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("process", ["worker", "scheduler"])
def test_worker_and_scheduler_start_and_keep_running_while_redis_is_down(process, tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            PROCESSES[process], cwd=ROOT, env=environment(REDIS_URL=f"redis://{CLOSED}/0"), stderr=stderr
        )
    try:
        deadline = time.monotonic() + 60
        while CLOSED not in log.read_text():  # it has tried Redis, and said so
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(2)
        assert proc.poll() is None, log.read_text()[-2000:]
    finally:
        proc.kill()
        proc.wait()


def test_flask_settings_shows_values_with_secrets_hidden(app, runner):
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://app:s3cret-pw@db.example.com/prod"
    app.config["API_KEYS"] = ["key-one", "key-two"]
    output = runner.invoke(args=["settings"]).output
    assert "DATABASE_URL=postgresql+psycopg://app:***@db.example.com/prod" in output
    assert "API_KEYS=(set, hidden)" in output and "key-one" not in output and "s3cret-pw" not in output
    assert "RETRY_INTERVALS=0,0,0" in output
    assert {line.split("=", 1)[0] for line in output.splitlines()} == {s.name for s in SETTINGS}


def test_under_honcho_its_env_file_wins_over_the_environment_as_the_readme_says(tmp_path):
    """honcho (2.0) reads the env file itself and hands its values to the Procfile's processes as their
    environment: set in both, the file's value wins (README, "To run the Procfile itself")."""
    file_port, env_port = free_port(), free_port()
    env_file = tmp_path / "deploy.env"
    env_file.write_text(f"PORT={file_port}\nREDIS_URL={TEST_REDIS_URL}\nDATABASE_URL={TEST_DATABASE_URL}\nAPI_KEYS=k\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "API_KEYS")}
    env.update(PORT=str(env_port), REDIS_URL=f"redis://{CLOSED}/0", LOG_LEVEL="WARNING")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    log = tmp_path / "honcho.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-e", str(env_file), "start", "web"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the web did not answer on the file's port:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{file_port}/health", timeout=5) as response:
                    health = json.loads(response.read())
                break
            except urllib.error.HTTPError as exc:
                health = json.loads(exc.read())
                break
            except OSError:
                time.sleep(0.3)
        assert health["redis"]["ok"] is True  # the file's REDIS_URL, not the environment's closed port
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", env_port), timeout=2).close()
    finally:
        # honcho starts each process in a group of its own: it stops them on SIGTERM; any left is killed.
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    ("database", "says"),
    [("campaigns_never_created", 'database "campaigns_never_created" does not exist'), (None, "Connection refused")],
)
def test_the_release_step_against_a_missing_database_says_so_in_one_line(database, says):
    url = f"postgresql://postgres:pw-not-shown@{CLOSED}/campaigns"
    if database:
        url = TEST_DATABASE_URL.rsplit("/", 1)[0] + "/" + database
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-c", "exec " + procfile_command("release")],
        cwd=ROOT,
        env=environment(DATABASE_URL=url, PATH=path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO  [alembic")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("database error: DATABASE_URL: ") and says in lines[0]
    assert "pw-not-shown" not in result.stderr
