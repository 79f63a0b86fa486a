"""API keys: who gets in, the `flask api-keys` commands, and the production start-up check."""

import os
import subprocess
import sys

import pytest

from app.auth import hash_key
from app.extensions import db
from app.models import ApiKey
from tests.conftest import ROOT, TEST_API_KEY, TEST_DATABASE_URL, TEST_REDIS_URL


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/customers"),
        ("post", "/customers"),
        ("get", "/customers/1"),
        ("delete", "/customers/1"),
        ("get", "/campaigns"),
        ("post", "/campaigns/1/send"),
        ("get", "/campaigns/1/messages"),
        ("get", "/no-such-page"),
    ],
)
def test_every_endpoint_needs_a_key(anonymous_client, method, path):
    response = getattr(anonymous_client, method)(path, json={})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = response.get_json()
    assert body["code"] == 401 and body["status"] == "Unauthorized"
    assert "Bearer" in body["message"]


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer", f"Basic {TEST_API_KEY}", TEST_API_KEY, "Bearer  "])
def test_wrong_key_or_scheme_is_401(anonymous_client, header):
    assert anonymous_client.get("/customers", headers={"Authorization": header}).status_code == 401


def test_bearer_scheme_is_case_insensitive(anonymous_client):
    assert anonymous_client.get("/customers", headers={"Authorization": f"bearer {TEST_API_KEY}"}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/openapi.json", "/docs", "/docs/assets/swagger-ui-bundle.js"])
def test_health_and_docs_need_no_key(anonymous_client, path):
    assert anonymous_client.get(path).status_code == 200


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
def test_other_methods_on_public_endpoints_are_json_405_without_a_key(anonymous_client, method):
    response = getattr(anonymous_client, method)("/health")
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert response.get_json()["code"] == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_options_answers_the_allowed_methods_with_no_body(client, anonymous_client):
    public = anonymous_client.options("/health")
    assert (public.status_code, public.data) == (204, b"")
    assert "text/html" not in public.headers.get("Content-Type", "")
    assert set(public.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    listed = client.options("/customers")
    assert (listed.status_code, listed.data) == (204, b"")
    assert set(listed.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "POST"}
    assert anonymous_client.options("/customers").status_code == 401


def test_created_key_works_until_revoked(runner, anonymous_client):
    result = runner.invoke(args=["api-keys", "create", "billing"])
    assert result.exit_code == 0, result.output
    key = result.output.strip()
    headers = {"Authorization": f"Bearer {key}"}
    assert anonymous_client.get("/customers", headers=headers).status_code == 200

    listed = runner.invoke(args=["api-keys", "list"]).output
    assert "billing" in listed and "active" in listed and key not in listed

    assert runner.invoke(args=["api-keys", "revoke", "billing"]).exit_code == 0
    assert anonymous_client.get("/customers", headers=headers).status_code == 401
    assert "revoked" in runner.invoke(args=["api-keys", "list"]).output


def test_only_the_hash_of_a_key_is_stored(runner):
    key = runner.invoke(args=["api-keys", "create", "ops"]).output.strip()
    row = db.session.scalar(db.select(ApiKey).where(ApiKey.name == "ops"))
    assert row.key_hash == hash_key(key) and len(row.key_hash) == 64
    assert key not in (row.key_hash, row.name)


def test_key_names_are_unique_and_revoke_needs_a_known_name(runner):
    assert runner.invoke(args=["api-keys", "create", "ops"]).exit_code == 0
    again = runner.invoke(args=["api-keys", "create", "ops"])
    assert again.exit_code != 0 and "exists" in again.output
    unknown = runner.invoke(args=["api-keys", "revoke", "nobody"])
    assert unknown.exit_code != 0 and "nobody" in unknown.output


def test_flask_up_key_is_kept_in_the_instance_folder_and_reused(app, anonymous_client, runner, tmp_path):
    from app.up import local_api_key

    app.config["API_KEYS"] = []
    app.instance_path = str(tmp_path)
    first, where = local_api_key(app)
    assert where == str(tmp_path / "local-api-key")
    assert oct((tmp_path / "local-api-key").stat().st_mode & 0o777) == "0o600"
    assert local_api_key(app)[0] == first  # a restart keeps the key the user saved
    assert anonymous_client.get("/customers", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    runner.invoke(args=["api-keys", "revoke", "local"])
    second, _ = local_api_key(app)  # a revoked (or lost) key is replaced
    assert second != first and (tmp_path / "local-api-key").read_text().strip() == second
    assert anonymous_client.get("/customers", headers={"Authorization": f"Bearer {second}"}).status_code == 200


def test_flask_up_uses_the_configured_key_when_there_is_one(app, tmp_path):
    from app.up import local_api_key

    app.instance_path = str(tmp_path)
    assert local_api_key(app) == (TEST_API_KEY, "the first key of API_KEYS")
    assert db.session.scalar(db.select(db.func.count()).select_from(ApiKey)) == 0
    assert not (tmp_path / "local-api-key").exists()


def _start_production_app(database_url: str, **env) -> subprocess.CompletedProcess:
    """Import `wsgi` (what gunicorn loads) in a fresh process with production settings."""
    environment = {k: v for k, v in os.environ.items() if k != "API_KEYS"}
    environment.update(DATABASE_URL=database_url, REDIS_URL=TEST_REDIS_URL, **env)
    return subprocess.run(
        [sys.executable, "-c", "import wsgi"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )


def _database_url(app) -> str:
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    return TEST_DATABASE_URL if uri.startswith("postgresql") else uri


def test_production_refuses_to_start_without_a_key(app):
    result = _start_production_app(_database_url(app))
    assert result.returncode != 0
    assert "no API key configured" in result.stderr


def test_production_starts_with_a_key_from_the_environment(app):
    result = _start_production_app(_database_url(app), API_KEYS="k1,k2")
    assert result.returncode == 0, result.stderr[-2000:]


def test_production_starts_with_a_key_in_the_database(app, runner):
    assert runner.invoke(args=["api-keys", "create", "web"]).exit_code == 0
    result = _start_production_app(_database_url(app))
    assert result.returncode == 0, result.stderr[-2000:]


def test_production_settings_let_cli_commands_run_without_a_key(app):
    """An operator migrates and creates the first key with the same settings as the web process."""
    environment = {k: v for k, v in os.environ.items() if k != "API_KEYS"}
    environment.update(DATABASE_URL=_database_url(app), REDIS_URL=TEST_REDIS_URL)
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "api-keys", "create", "first"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    key = result.stdout.strip()
    assert db.session.scalar(db.select(ApiKey.key_hash).where(ApiKey.name == "first")) == hash_key(key)
