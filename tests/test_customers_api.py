import threading
from unittest.mock import patch

import pytest
from sqlalchemy import exists, func, select

from app.extensions import db
from app.messaging import recipients
from app.models import Customer, OutboundMessage
from tests.conftest import TEST_API_KEY
from tests.factories import make_campaign, make_customer


def test_create_customer_normalizes_phone(client):
    response = client.post("/customers", json={"phone": "0712345678", "first_name": "Amina", "location": "Nairobi"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["phone"] == "+254712345678"
    assert body["first_name"] == "Amina"
    assert body["last_name"] is None
    assert body["created_at"].endswith("+00:00")
    assert client.get(f"/customers/{body['id']}").get_json() == body


def test_invalid_phone_is_422_and_creates_nothing(client):
    response = client.post("/customers", json={"phone": "12345"})
    assert response.status_code == 422
    assert "phone" in response.get_json()["message"]
    assert client.get("/customers").get_json()["pagination"]["total"] == 0


def test_duplicate_phone_in_another_format_is_409(client):
    assert client.post("/customers", json={"phone": "+254712345678"}).status_code == 201
    response = client.post("/customers", json={"phone": "0712 345 678"})
    assert response.status_code == 409
    assert "+254712345678" in response.get_json()["message"]


def test_missing_phone_and_unknown_field_are_named(client):
    response = client.post("/customers", json={"nickname": "x"})
    assert response.status_code == 422
    message = response.get_json()["message"]
    assert "phone" in message and "nickname" in message


def test_patch_changes_fields_and_renormalizes_phone(client, app):
    customer = make_customer(first_name="Old")
    response = client.patch(f"/customers/{customer.id}", json={"first_name": "New", "phone": "0799000111"})
    assert response.status_code == 200
    assert response.get_json()["first_name"] == "New"
    assert response.get_json()["phone"] == "+254799000111"


def test_patch_to_taken_phone_is_409(client):
    a = make_customer()
    b = make_customer()
    response = client.patch(f"/customers/{b.id}", json={"phone": a.phone})
    assert response.status_code == 409
    assert client.get(f"/customers/{b.id}").get_json()["phone"] == b.phone


def test_delete_customer(client):
    customer = make_customer()
    assert client.delete(f"/customers/{customer.id}").status_code == 204
    assert client.get(f"/customers/{customer.id}").status_code == 404
    assert client.delete(f"/customers/{customer.id}").status_code == 404


def test_delete_customer_with_messages_is_409(client):
    customer = make_customer()
    campaign = make_campaign()
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [customer.id]}).status_code == 202
    response = client.delete(f"/customers/{customer.id}")
    assert response.status_code == 409
    assert client.get(f"/customers/{customer.id}").status_code == 200


def test_list_filters_by_location_newest_first(client):
    ids = [make_customer(location=loc).id for loc in ("Nairobi", "Mombasa", "Nairobi")]
    body = client.get("/customers?location=Nairobi").get_json()
    assert [c["id"] for c in body["data"]] == [ids[2], ids[0]]
    assert body["pagination"] == {"page": 1, "page_size": 20, "total": 2, "total_pages": 1, "next_cursor": None}


def test_unknown_customer_is_404_json(client):
    response = client.get("/customers/999")
    assert response.status_code == 404
    assert response.get_json()["message"] == "customer 999 not found"


def request_in_thread(app, method: str, path: str, answers: dict, name: str, barrier=None, **kwargs):
    """Start a thread making one API request with its own app context (its own database session);
    its response lands in `answers[name]`."""

    def run():
        with app.app_context():
            test_client = app.test_client()
            if barrier is not None:
                barrier.wait()
            answers[name] = getattr(test_client, method)(
                path, headers={"Authorization": f"Bearer {TEST_API_KEY}"}, **kwargs
            )

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.real_only
def test_delete_waits_for_a_send_in_progress_and_refuses(app, client):
    """A send that has inserted (not yet committed) a message for the customer makes a concurrent
    delete wait for it, then answer 409: the customer is never deleted under its messages."""
    customer = make_customer()
    campaign = make_campaign()
    inserted, release = threading.Event(), threading.Event()
    original = recipients.create_pending_messages

    def insert_then_wait(*args, **kwargs):
        rows = original(*args, **kwargs)
        inserted.set()
        release.wait(10)
        return rows

    answers = {}
    with patch.object(recipients, "create_pending_messages", insert_then_wait):
        body = {"customer_ids": [customer.id]}
        sender = request_in_thread(app, "post", f"/campaigns/{campaign.id}/send", answers, "send", json=body)
        assert inserted.wait(10)
        deleter = request_in_thread(app, "delete", f"/customers/{customer.id}", answers, "delete")
        deleter.join(1)
        waited = deleter.is_alive()
        release.set()
        sender.join(10)
        deleter.join(10)
    assert waited, "the delete must wait for the send's transaction"
    assert answers["send"].status_code == 202
    assert answers["delete"].status_code == 409
    assert client.get(f"/customers/{customer.id}").status_code == 200


@pytest.mark.real_only
def test_concurrent_sends_and_deletes_never_leave_messages_without_a_customer(app, client):
    """Races a send and a delete of the same customer many times: never both succeed."""
    campaign = make_campaign()
    outcomes = []
    for _ in range(40):
        customer = make_customer()
        barrier = threading.Barrier(2)
        answers: dict = {}
        body = {"customer_ids": [customer.id]}
        threads = [
            request_in_thread(app, "post", f"/campaigns/{campaign.id}/send", answers, "send", barrier, json=body),
            request_in_thread(app, "delete", f"/customers/{customer.id}", answers, "delete", barrier),
        ]
        for thread in threads:
            thread.join(10)
        outcomes.append((answers["send"].status_code, answers["delete"].status_code))
    db.session.rollback()
    orphans = db.session.scalar(
        select(func.count())
        .select_from(OutboundMessage)
        .where(~exists().where(Customer.id == OutboundMessage.customer_id))
    )
    assert orphans == 0, outcomes
    assert all(delete in (204, 409) for _, delete in outcomes), outcomes


def test_a_valid_phone_over_15_digits_is_stored_as_given(client):
    response = client.post("/customers", json={"phone": "+49335199080462505"})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["phone"] == "+49335199080462505"
    other = client.post("/customers", json={"phone": "0712345678"}).get_json()
    response = client.patch(f"/customers/{other['id']}", json={"phone": "+49 3351 99080462506"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["phone"] == "+49335199080462506"


@pytest.mark.parametrize("phone", ["+254711000352;ext=12", "0711000350x", "0711000350 ext. 12", "0711000350#12"])
def test_phone_extensions_are_refused(client, phone):
    response = client.post("/customers", json={"phone": phone})
    assert response.status_code == 422
    assert "extension" in response.get_json()["message"]
    customer = make_customer()
    response = client.patch(f"/customers/{customer.id}", json={"phone": phone})
    assert response.status_code == 422
    assert client.get("/customers").get_json()["pagination"]["total"] == 1
