"""GET /health: the database, Redis, queue depth and workers; 503 when a dependency is down."""

from redis import Redis

from app import create_app
from app.extensions import db
from app.messaging.worker import build_worker
from tests.conftest import TEST_OVERRIDES
from tests.factories import make_campaign, make_customers

CLOSED_PORT = 1  # nothing listens there: connections are refused at once


def test_healthy_service(anonymous_client):
    response = anonymous_client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "database": {"ok": True},
        "redis": {"ok": True},
        "queue_depth": 0,
        "workers": 0,
    }


def test_reports_queue_depth_and_live_workers(app, client, anonymous_client):
    ids = make_customers(3)
    client.post(f"/campaigns/{make_campaign().id}/send", json={"customer_ids": ids})
    worker = build_worker(app)
    worker.register_birth()
    try:
        body = anonymous_client.get("/health").get_json()
    finally:
        worker.register_death()
    assert body["queue_depth"] == 3
    assert body["workers"] == 1


def test_redis_down_is_503(app, anonymous_client):
    app.extensions["redis"] = Redis(port=CLOSED_PORT)
    response = anonymous_client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["database"] == {"ok": True}
    assert body["redis"] == {"ok": False, "error": "redis unreachable"}
    assert body["queue_depth"] is None and body["workers"] is None


def test_database_down_is_503_and_shows_no_internals(app, redis_conn, tmp_path):
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite"):
        down = f"sqlite:///{tmp_path}/missing-dir/db.sqlite"
    else:
        down = f"postgresql+psycopg://postgres@127.0.0.1:{CLOSED_PORT}/campaigns"
    broken = create_app("config.Config", {**TEST_OVERRIDES, "SQLALCHEMY_DATABASE_URI": down})
    broken.extensions["redis"] = redis_conn
    try:
        response = broken.test_client().get("/health")
    finally:
        with broken.app_context():
            db.engine.dispose()
    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == {"ok": False, "error": "database unreachable"}
    assert body["redis"] == {"ok": True}
    assert "missing-dir" not in response.get_data(as_text=True)
    assert str(CLOSED_PORT) + "/" not in response.get_data(as_text=True)
