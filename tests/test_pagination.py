"""Cursor pagination on every list: `cursor` in, `next_cursor` out, stable while rows are added and changed
(app.pagination)."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from sqlalchemy import create_engine, text

from app.extensions import db
from app.secrets import secret_key
from tests.factories import make_campaign, make_customer, make_customers


def walk(client, url: str, page_size: int, between_pages=None, **query) -> list[int]:
    """Every id of the list, page after page by cursor (starting with the plain first page); `between_pages`
    runs after each page."""
    ids, cursor = [], None
    for _ in range(10_000):
        params = {"page_size": page_size, **query, **({"cursor": cursor} if cursor else {})}
        response = client.get(url, query_string=params)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        ids += [row["id"] for row in body["data"]]
        cursor = body["pagination"]["next_cursor"]
        if cursor is None:
            return ids
        if between_pages:
            between_pages()
    raise AssertionError("the walk never ended")


def sent_campaign(client, customers: int = 0) -> tuple[int, list[int]]:
    ids = make_customers(customers) if customers else []
    campaign_id = make_campaign().id
    if ids:
        assert client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids}).status_code == 202
    message_ids = [row[0] for row in db.session.execute(text("SELECT id FROM outbound_messages ORDER BY id"))]
    return campaign_id, message_ids


def test_each_list_walks_by_cursor_newest_first_and_ends_with_a_null_cursor(client):
    campaigns = [make_campaign().id for _ in range(7)]
    campaign_id, messages = sent_campaign(client, 7)
    customers = [row[0] for row in db.session.execute(text("SELECT id FROM customers"))]
    assert walk(client, "/customers", 3) == sorted(customers, reverse=True)
    assert walk(client, "/campaigns", 3) == sorted([*campaigns, campaign_id], reverse=True)
    assert walk(client, f"/campaigns/{campaign_id}/messages", 3) == sorted(messages, reverse=True)


def test_a_cursor_page_counts_nothing_and_the_last_page_has_no_cursor(client):
    make_customers(3)
    first = client.get("/customers", query_string={"page_size": 2}).get_json()["pagination"]
    assert first["total"] == 3 and first["next_cursor"]
    last = client.get("/customers", query_string={"page_size": 2, "cursor": first["next_cursor"]}).get_json()
    assert len(last["data"]) == 1
    assert last["pagination"] == {"page": None, "page_size": 2, "total": None, "total_pages": None, "next_cursor": None}
    # A full last page: no cursor either (one row more is read to know).
    exact = client.get("/customers", query_string={"page_size": 3}).get_json()["pagination"]
    assert exact["next_cursor"] is None


def test_cursor_keeps_the_list_filter(client):
    nairobi = [make_customer(location="Nairobi").id for _ in range(4)]
    make_customers(4, location="Mombasa")
    assert walk(client, "/customers", 2, location="Nairobi") == nairobi[::-1]


def test_status_filtered_messages_walk_by_cursor(client):
    campaign_id, ids = sent_campaign(client, 6)
    db.session.execute(text("UPDATE outbound_messages SET status = 'failed' WHERE id % 2 = 0"))
    db.session.commit()
    failed = [i for i in ids if i % 2 == 0]
    assert walk(client, f"/campaigns/{campaign_id}/messages", 2, status="failed") == failed[::-1]


@pytest.mark.parametrize(
    "query, field",
    [
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "eyJ2IjoxfQ"}, "cursor"),  # base64 of {"v":1}: no position
        ({"cursor": "W10"}, "cursor"),  # base64 of []: not an object
        ({"cursor": "x" * 201}, "cursor"),
        ({"cursor": ""}, "cursor"),
        ({"page": 2, "cursor": "abc"}, "cursor"),
        ({"page_size": 101, "cursor": "abc"}, "page_size"),
    ],
)
def test_a_bad_cursor_is_a_422_naming_it_and_lists_nothing(client, query, field):
    make_customers(2)
    response = client.get("/customers", query_string=query)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]


def test_a_cursor_of_another_list_is_refused(client):
    make_customers(3)
    cursor = client.get("/customers", query_string={"page_size": 1}).get_json()["pagination"]["next_cursor"]
    response = client.get("/campaigns", query_string={"cursor": cursor})
    assert response.status_code == 422
    assert "cursor" in response.get_json()["errors"]


def edited(cursor: str, **changes) -> str:
    """`cursor` with its JSON body changed (a key added, or one given another value), whatever proof it
    carries kept as it is: what a client that edits a cursor sends."""
    body, dot, proof = cursor.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw = json.dumps({**payload, **changes}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=") + dot + proof


def next_cursor(client, url: str) -> str:
    cursor = client.get(url, query_string={"page_size": 1}).get_json()["pagination"]["next_cursor"]
    assert cursor
    return cursor


def test_an_edited_cursor_is_a_422_naming_it(client):
    make_customers(3)
    for _ in range(3):
        make_campaign()
    customers = next_cursor(client, "/customers")
    campaigns = next_cursor(client, "/campaigns")
    assert client.get("/customers", query_string={"cursor": customers}).status_code == 200
    for url, cursor in [
        ("/customers", edited(customers, extra=1)),  # a key the service never writes
        ("/customers", edited(campaigns, list="customers")),  # a campaigns cursor made a customers cursor
        ("/customers", edited(customers, before=1_000_000)),  # another position
    ]:
        response = client.get(url, query_string={"cursor": cursor})
        assert response.status_code == 422, (cursor, response.get_json())
        assert list(response.get_json()["errors"]) == ["cursor"]


def test_a_cursor_is_refused_once_the_secret_key_changes(app, client):
    app.config["SECRET_KEY"] = "k" * 32
    make_customers(3)
    cursor = next_cursor(client, "/customers")
    assert client.get("/customers", query_string={"cursor": cursor}).status_code == 200
    app.config["SECRET_KEY"] = "another key, of 32 characters or more"
    assert client.get("/customers", query_string={"cursor": cursor}).status_code == 422


def test_without_a_secret_key_every_process_uses_the_one_the_database_keeps(app, app_with, client):
    assert app.config["SECRET_KEY"] == ""
    make_customers(3)
    cursor = next_cursor(client, "/customers")
    other = app_with()  # another process of the same deployment: the same database, no setting
    with other.app_context():
        other_client = other.test_client()
        other_client.environ_base["HTTP_AUTHORIZATION"] = client.environ_base["HTTP_AUTHORIZATION"]
        assert other_client.get("/customers", query_string={"cursor": cursor}).status_code == 200
        assert secret_key(other) == secret_key(app)
    assert db.session.scalar(text("SELECT count(*) FROM service_secrets")) == 1
    # Another deployment (a database without the key) makes its own: the cursor is not its.
    db.session.execute(text("DELETE FROM service_secrets"))
    db.session.commit()
    third = app_with()
    with third.app_context():
        assert secret_key(third) != secret_key(app)
        third_client = third.test_client()
        third_client.environ_base["HTTP_AUTHORIZATION"] = client.environ_base["HTTP_AUTHORIZATION"]
        assert third_client.get("/customers", query_string={"cursor": cursor}).status_code == 422


def test_processes_that_start_at_once_agree_on_the_key(app, app_with):
    apps = [app_with() for _ in range(6)]
    barrier = threading.Barrier(len(apps))
    keys: list[bytes] = []

    def first_use(other) -> None:
        with other.app_context():
            barrier.wait()
            keys.append(secret_key(other))

    threads = [threading.Thread(target=first_use, args=(other,)) for other in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == len(apps) and len(set(keys)) == 1
    assert len(keys[0]) >= 32
    assert db.session.scalar(text("SELECT count(*) FROM service_secrets")) == 1


def test_a_cursor_of_an_unknown_campaign_is_a_404(client):
    response = client.get("/campaigns/999/messages", query_string={"cursor": "abc"})
    assert response.status_code == 404


def test_a_cursor_walk_sees_each_row_that_existed_once_while_rows_are_added_and_changed(client):
    """Between every two pages, new campaigns are created and existing ones renamed: the cursor walk sees
    each campaign that existed when it started exactly once, where numbered pages would repeat rows."""
    existing = [make_campaign(name=f"c{i}").id for i in range(20)]

    def churn():
        make_campaign(name="new")
        db.session.execute(text("UPDATE campaigns SET name = name || '+', status = 'sending' WHERE id % 3 = 0"))
        db.session.commit()

    seen = walk(client, "/campaigns", 3, between_pages=churn)
    old = [i for i in seen if i in existing]
    assert old == sorted(existing, reverse=True)  # each once, in order
    # Numbered pages over the same churn repeat rows: what the cursor is for.
    numbered = []
    for page in range(1, 8):
        numbered += [
            c["id"] for c in client.get("/campaigns", query_string={"page": page, "page_size": 3}).get_json()["data"]
        ]
        churn()
    assert len(numbered) != len(set(numbered))


@pytest.mark.real_only
def test_a_cursor_walk_over_messages_stays_exact_while_other_sessions_write(client, app):
    """Another connection inserts messages into the campaign and changes statuses as fast as it can while
    the client walks the campaign's messages by cursor, 7 at a time."""
    campaign_id, ids = sent_campaign(client, 300)
    stop = threading.Event()
    writes = []
    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])

    def writer():
        n = 0
        with engine.connect() as conn:
            while not stop.is_set():
                n += 1
                conn.execute(
                    text("INSERT INTO customers (phone, created_at, updated_at) VALUES (:phone, now(), now())"),
                    {"phone": f"+2547999{n:05d}"},
                )
                conn.execute(
                    text(
                        "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, created_at, "
                        "updated_at) SELECT :c, max(id), 'pending', 0, now(), now() FROM customers"
                    ),
                    {"c": campaign_id},
                )
                conn.execute(
                    text("UPDATE outbound_messages SET status = 'sent' WHERE id = :id"), {"id": ids[n % len(ids)]}
                )
                conn.commit()
                writes.append(n)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = walk(client, f"/campaigns/{campaign_id}/messages", 7)
    finally:
        stop.set()
        thread.join()
        engine.dispose()
    assert len(writes) > 20  # the walk did run while rows were written
    assert [i for i in seen if i in set(ids)] == sorted(ids, reverse=True)
    assert len(seen) == len(set(seen))
