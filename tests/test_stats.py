"""Campaign stats: in the list and the detail, kept by PostgreSQL's triggers and folded, exact under
concurrent writers, recounted from the rows when a campaign ends (app.messaging.stats)."""

from __future__ import annotations

import random
import threading
import time

import pytest
from flask_migrate import downgrade, upgrade
from sqlalchemy import create_engine, event, func, select, text

from app.extensions import db
from app.messaging import stats
from app.models import CampaignMessageCountChange, MessageStatus
from tests.conftest import MIGRATIONS
from tests.factories import make_campaign, make_customers
from tests.helpers import stats as expected_stats


def send(client, campaign_id: int, customer_ids: list[int]) -> None:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": customer_ids})
    assert response.status_code == 202, response.get_json()


def counted_from_rows(campaign_ids) -> dict:
    """The stats counted from the messages themselves (what SQLite reads; the truth the kept counts must equal)."""
    counted = stats.stats_from(db.session.execute(stats.rows_query(campaign_ids)))
    return {campaign_id: counted.get(campaign_id) for campaign_id in campaign_ids}


def kept(campaign_ids) -> dict:
    read = stats.stats_from(db.session.execute(stats.counts_query(campaign_ids)))
    return {campaign_id: read.get(campaign_id) for campaign_id in campaign_ids}


def test_every_campaign_in_the_list_carries_the_stats_its_detail_has(client, work):
    customers = make_customers(5)
    busy, quiet, empty = (make_campaign(name=n).id for n in ("busy", "quiet", "empty"))
    send(client, busy, customers)
    send(client, quiet, customers[:2])
    work()
    db.session.execute(text("UPDATE outbound_messages SET status = 'delivered', read_at = updated_at WHERE id = 1"))
    db.session.commit()
    listed = {c["id"]: c for c in client.get("/campaigns").get_json()["data"]}
    for campaign_id in (busy, quiet, empty):
        detail = client.get(f"/campaigns/{campaign_id}").get_json()
        assert listed[campaign_id]["stats"] == detail["stats"]
    assert listed[busy]["stats"] == expected_stats(total=5, sent=4, delivered=1, read=1)
    assert listed[quiet]["stats"] == expected_stats(total=2, sent=2)
    assert listed[empty]["stats"] == expected_stats()


@pytest.mark.real_only
def test_the_database_keeps_the_counts_of_every_kind_of_write(client, app):
    customers = make_customers(30)
    first, second = make_campaign().id, make_campaign().id
    send(client, first, customers)
    send(client, second, customers[:10])
    writes = [
        "UPDATE outbound_messages SET status = 'sent', segments = 2 WHERE id % 3 = 0",
        "UPDATE outbound_messages SET status = 'delivered', read_at = now() WHERE id % 6 = 0",
        "UPDATE outbound_messages SET status = 'failed' WHERE id % 7 = 0",
        "UPDATE outbound_messages SET last_error = 'x'",  # changes no count
        "UPDATE outbound_messages SET campaign_id = :second WHERE id = 25",  # moves a message between campaigns
        "DELETE FROM outbound_messages WHERE id % 11 = 0",
        "UPDATE outbound_messages SET segments = NULL, read_at = NULL WHERE id % 12 = 0",
    ]
    for sql in writes:
        db.session.execute(text(sql), {"second": second})
        db.session.commit()
        assert kept([first, second]) == counted_from_rows([first, second]), sql
    assert stats.fold_all() > 0
    assert db.session.scalar(select(func.count()).select_from(CampaignMessageCountChange)) == 0
    assert kept([first, second]) == counted_from_rows([first, second])
    assert client.get(f"/campaigns/{first}").get_json()["stats"]["total"] == counted_from_rows([first])[first]["total"]


@pytest.mark.real_only
def test_counts_stay_exact_under_concurrent_writers_folds_and_readers(client, app):
    """Four connections move messages between statuses at random as fast as they can, two fold at the same
    time, and a reader checks that every read adds up to the campaign's size; at the end the kept counts
    are the rows' counts."""
    size = 400
    campaign_id = make_campaign().id
    send(client, campaign_id, make_customers(size))
    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"], pool_size=8)
    stop = threading.Event()
    errors: list[BaseException] = []
    writes, folds, reads = [0], [0], [0]

    def guarded(body):
        def run():
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                stop.set()

        return run

    def writer(seed: int):
        rng = random.Random(seed)
        statuses = list(MessageStatus.ALL)
        with engine.connect() as conn:
            while not stop.is_set():
                ids = rng.sample(range(1, size + 1), rng.choice([1, 1, 1, 5]))
                conn.execute(
                    text(
                        "UPDATE outbound_messages SET status = :status, segments = :segments, "
                        "read_at = CASE WHEN :read THEN now() END WHERE id = ANY(:ids)"
                    ),
                    {
                        "status": rng.choice(statuses),
                        "segments": rng.randint(1, 3),
                        "read": rng.random() < 0.3,
                        "ids": ids,
                    },
                )
                conn.commit()
                writes[0] += 1

    def folder():
        with app.app_context():
            while not stop.is_set():
                folds[0] += stats.fold(batch=rng_batch.choice([3, 50, 1000]))
                db.session.remove()

    def reader():
        with app.app_context():
            while not stop.is_set():
                figures = stats.campaign_stats(campaign_id)
                assert figures["total"] == size, figures
                assert sum(figures[s] for s in MessageStatus.ALL) == size
                reads[0] += 1
                db.session.remove()

    rng_batch = random.Random(1)
    threads = [threading.Thread(target=guarded(lambda s=s: writer(s))) for s in range(4)]
    threads += [threading.Thread(target=guarded(folder)) for _ in range(2)]
    threads += [threading.Thread(target=guarded(reader))]
    for thread in threads:
        thread.start()
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert not errors, errors
    assert writes[0] > 200 and folds[0] > 0 and reads[0] > 20, (writes, folds, reads)
    assert kept([campaign_id]) == counted_from_rows([campaign_id])
    stats.fold_all()
    assert kept([campaign_id]) == counted_from_rows([campaign_id])


@pytest.mark.real_only
def test_reading_a_campaigns_stats_reads_none_of_its_messages(client, app, work):
    """The detail and the list read the kept counts: no statement scans the campaign's messages (a pending
    campaign's one extra query reads the partial index of messages held by quiet hours)."""
    customers = make_customers(20)
    finished, sending = make_campaign().id, make_campaign().id
    send(client, finished, customers)
    work()
    send(client, sending, customers)
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        assert client.get(f"/campaigns/{finished}").get_json()["stats"]["sent"] == 20
        assert not [s for s in statements if "outbound_messages" in s], statements
        statements.clear()
        listed = client.get("/campaigns").get_json()["data"]
        assert {c["id"]: c["stats"]["queued"] for c in listed} == {finished: 0, sending: 20}
        assert not [s for s in statements if "outbound_messages" in s], statements
        # A campaign with messages waiting their turn asks one more query, of the partial index of messages
        # held by quiet hours.
        db.session.execute(
            text("UPDATE outbound_messages SET status = 'pending' WHERE campaign_id = :c"), {"c": sending}
        )
        db.session.commit()
        statements.clear()
        assert client.get(f"/campaigns/{sending}").get_json()["stats"]["pending"] == 20
        touching = [s for s in statements if "outbound_messages" in s]
        assert len(touching) == 1 and "not_before >" in touching[0], touching
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


@pytest.mark.real_only
def test_a_campaign_that_ends_has_its_counts_recounted_from_its_rows(client, app, work):
    campaign_id = make_campaign().id
    send(client, campaign_id, make_customers(6))
    stats.fold_all()
    # Counts gone wrong (a change made with the triggers off, say): the end of the campaign puts them right.
    db.session.execute(text("UPDATE campaign_message_counts SET messages = messages + 5 WHERE status = 'queued'"))
    db.session.commit()
    assert client.get(f"/campaigns/{campaign_id}").get_json()["stats"]["total"] == 11
    work()
    detail = client.get(f"/campaigns/{campaign_id}").get_json()
    assert detail["status"] == "sent"
    assert detail["stats"] == expected_stats(total=6, sent=6)
    assert kept([campaign_id]) == counted_from_rows([campaign_id])


@pytest.mark.real_only
def test_a_worker_folds_the_changes_in_the_background(client, app):
    app.config["STATS_FOLD_INTERVAL"] = 0.05
    campaign_id = make_campaign().id
    send(client, campaign_id, make_customers(10))
    db.session.execute(text("UPDATE outbound_messages SET status = 'sent' WHERE id <= 4"))
    db.session.commit()
    assert stats.pending_changes() >= 2
    folder = stats.Folder(app).start()
    try:
        deadline = time.monotonic() + 10
        while stats.pending_changes() and time.monotonic() < deadline:
            db.session.rollback()
            time.sleep(0.05)
    finally:
        folder.stop()
    assert stats.pending_changes() == 0
    assert kept([campaign_id]) == counted_from_rows([campaign_id])
    assert kept([campaign_id])[campaign_id]["sent"] == 4


@pytest.mark.real_only
def test_upgrading_counts_the_messages_already_there(client, app):
    campaign_id = make_campaign().id
    send(client, campaign_id, make_customers(8))
    db.session.execute(
        text("UPDATE outbound_messages SET status = 'delivered', segments = 3, read_at = now() WHERE id <= 3")
    )
    db.session.commit()
    db.session.remove()
    downgrade(directory=MIGRATIONS, revision="0010")
    try:
        db.session.execute(text("UPDATE outbound_messages SET status = 'failed' WHERE id = 8"))
        db.session.commit()
    finally:
        db.session.remove()
        upgrade(directory=MIGRATIONS)
    assert kept([campaign_id]) == counted_from_rows([campaign_id])
    assert client.get(f"/campaigns/{campaign_id}").get_json()["stats"] == expected_stats(
        total=8, pending=4, delivered=3, failed=1, read=3, segments_sent=9
    )
