"""Saved segments, the audience count, a segment a scheduled campaign evaluates when it fires, and the
frequency cap across campaigns."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.extensions import db
from app.messaging.send.window import SEND_JOB  # noqa: F401 - the worker's jobs are importable
from app.messaging.triggers import dispatch_job_id
from app.models import Customer, CustomerOptOut, OutboundMessage
from app.queues import get_control_queue
from config import frequency_cap
from tests.factories import make_campaign, make_customer

GOLD = {"field": "attributes.tier", "op": "eq", "value": "gold"}


def save(client, name="Gold", spec=GOLD) -> dict:
    response = client.post("/segments", json={"name": name, "filter": spec})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def recipients_of(campaign_id: int) -> list[str]:
    db.session.rollback()
    return sorted(
        db.session.scalars(
            select(Customer.first_name)
            .join(OutboundMessage, OutboundMessage.customer_id == Customer.id)
            .where(OutboundMessage.campaign_id == campaign_id)
        )
    )


def test_segments_are_saved_listed_changed_and_deleted(client):
    first = save(client)
    second = save(client, "Nairobi", {"field": "location", "op": "eq", "value": "Nairobi"})
    assert first["filter"] == GOLD and first["name"] == "Gold"
    page = client.get("/segments", query_string={"page_size": 1}).get_json()
    assert [s["id"] for s in page["data"]] == [second["id"]]
    cursor = page["pagination"]["next_cursor"]
    assert [s["id"] for s in client.get("/segments", query_string={"cursor": cursor}).get_json()["data"]] == [
        first["id"]
    ]
    changed = client.patch(f"/segments/{first['id']}", json={"name": "Gold tier"}).get_json()
    assert (changed["name"], changed["filter"]) == ("Gold tier", GOLD)
    assert client.get(f"/segments/{first['id']}").get_json()["name"] == "Gold tier"
    assert client.delete(f"/segments/{first['id']}").status_code == 204
    assert client.get(f"/segments/{first['id']}").status_code == 404
    assert client.delete(f"/segments/{first['id']}").status_code == 404


def test_a_segment_with_a_bad_filter_is_refused_naming_the_path(client):
    response = client.post("/segments", json={"name": "x", "filter": {"any": [{"field": "tier", "op": "eq"}]}})
    assert response.status_code == 422
    assert set(response.get_json()["errors"]) == {"filter.any.0.field"}
    segment = save(client)
    response = client.patch(f"/segments/{segment['id']}", json={"filter": {"not": {"opted_out": "fax"}}})
    assert response.status_code == 422 and set(response.get_json()["errors"]) == {"filter.not.opted_out"}
    assert client.get(f"/segments/{segment['id']}").get_json()["filter"] == GOLD


def test_the_count_answers_customers_opt_outs_and_the_capped(client, app, clock):
    amina = make_customer(first_name="Amina", attributes={"tier": "gold"})
    brian = make_customer(first_name="Brian", attributes={"tier": "gold"})
    make_customer(first_name="Chen", attributes={"tier": "gold"})
    make_customer(first_name="Dana", attributes={"tier": "silver"})
    db.session.add(CustomerOptOut(customer_id=brian.id, channel="whatsapp", source="api"))
    other = make_campaign()
    db.session.add(OutboundMessage(campaign_id=other.id, customer_id=amina.id, status="sent", sent_at=clock.now()))
    db.session.commit()
    segment = save(client)
    expected = {"customers": 3, "opted_out": {"sms": 0, "whatsapp": 1}, "frequency_capped": 0}
    assert client.post("/audiences/count", json={"filter": GOLD}).get_json() == expected
    assert client.post("/audiences/count", json={"segment_id": segment["id"]}).get_json() == expected
    app.config["FREQUENCY_CAP"] = frequency_cap("1/7d")
    assert client.post("/audiences/count", json={"filter": GOLD}).get_json()["frequency_capped"] == 1
    listed = client.get("/customers", query_string={"segment_id": segment["id"]}).get_json()["data"]
    assert sorted(c["first_name"] for c in listed) == ["Amina", "Brian", "Chen"]


def test_count_and_list_refuse_what_is_not_an_audience(client):
    assert client.post("/audiences/count", json={"filter": GOLD, "segment_id": 1}).status_code == 422
    response = client.post("/audiences/count", json={"segment_id": 999})
    assert response.status_code == 422 and response.get_json()["errors"] == {"segment_id": ["no segment with id 999"]}
    response = client.post("/audiences/count", json={"filter": {"all": [GOLD, {"field": "x", "op": "eq"}]}})
    assert set(response.get_json()["errors"]) == {"filter.all.1.field"}
    assert client.get("/customers", query_string={"segment_id": 999}).status_code == 422


def test_a_send_and_an_estimate_name_a_segment(client):
    make_customer(first_name="Amina", attributes={"tier": "gold"})
    make_customer(first_name="Dana", attributes={"tier": "silver"})
    segment = save(client)
    campaign = make_campaign()
    body = {"audience": {"segment_id": segment["id"]}}
    assert client.post(f"/campaigns/{campaign.id}/estimate", json=body).get_json()["recipients"] == 1
    assert client.post(f"/campaigns/{campaign.id}/send", json=body).status_code == 202
    assert recipients_of(campaign.id) == ["Amina"]
    response = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"segment_id": 999}})
    assert response.status_code == 422
    assert response.get_json()["errors"] == {"audience.segment_id": ["no segment with id 999"]}


def fire(campaign_id: int, work) -> None:
    get_control_queue().enqueue(
        "app.messaging.jobs.dispatch_scheduled_campaign", campaign_id, job_id=dispatch_job_id(campaign_id)
    )
    work()


def test_a_scheduled_campaign_evaluates_its_segment_when_it_fires(client, clock, work):
    amina = make_customer(first_name="Amina", attributes={"tier": "gold"})
    make_customer(first_name="Brian", attributes={"tier": "silver"})
    segment = save(client)
    at = clock.now() + timedelta(hours=1)
    body = {"name": "Later", "channel": "sms", "base_template": "Hi {first_name}", "scheduled_at": at.isoformat()}
    campaign = client.post("/campaigns", json=body).get_json()
    answer = client.post(f"/campaigns/{campaign['id']}/send", json={"audience": {"segment_id": segment["id"]}})
    assert answer.status_code == 202
    assert answer.get_json()["segment_evaluated_at_fire"] is True
    assert answer.get_json()["messages_scheduled"] == 0
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["segment_id"] == segment["id"]
    # The segment is in use: it cannot be deleted while the campaign waits on it.
    response = client.delete(f"/segments/{segment['id']}")
    assert response.status_code == 409 and response.get_json()["campaign_ids"] == [campaign["id"]]
    # Meanwhile Amina leaves the segment, Brian and a new customer join it.
    client.patch(f"/customers/{amina.id}", json={"attributes": {"tier": "bronze"}})
    client.patch(f"/customers/{amina.id + 1}", json={"attributes": {"tier": "gold"}})
    make_customer(first_name="Chen", attributes={"tier": "Gold"})
    clock.advance(hours=1)
    fire(campaign["id"], work)
    assert recipients_of(campaign["id"]) == ["Brian", "Chen"]
    detail = client.get(f"/campaigns/{campaign['id']}").get_json()
    assert detail["status"] == "sent" and detail["stats"]["sent"] == 2 and detail["segment_id"] is None
    assert client.delete(f"/segments/{segment['id']}").status_code == 204  # no longer in use


def test_the_frequency_cap_holds_back_customers_across_two_campaigns(client, app, work):
    app.config["FREQUENCY_CAP"] = frequency_cap("1/7d")
    make_customer(first_name="Amina")
    make_customer(first_name="Brian")
    audience = {"audience": {"all": True}}
    first = make_campaign()
    answer = client.post(f"/campaigns/{first.id}/send", json={"customer_ids": [c for c in _ids()][:1]}).get_json()
    assert answer["skipped_frequency_cap"] == 0
    work()  # Amina's message is sent: she has had her one message this week
    second = make_campaign()
    estimate = client.post(f"/campaigns/{second.id}/estimate", json=audience).get_json()
    assert (estimate["recipients"], estimate["skipped_frequency_cap"]) == (1, 1)
    answer = client.post(f"/campaigns/{second.id}/send", json=audience).get_json()
    assert (answer["messages_queued"], answer["skipped_frequency_cap"]) == (1, 1)
    assert recipients_of(second.id) == ["Brian"]
    # A one-time code goes whatever came before.
    code = make_campaign(ignore_frequency_cap=True)
    assert client.post(f"/campaigns/{code.id}/send", json=audience).get_json()["skipped_frequency_cap"] == 0
    assert recipients_of(code.id) == ["Amina", "Brian"]


def test_a_capped_audience_is_a_422_that_says_why(client, app, work):
    app.config["FREQUENCY_CAP"] = frequency_cap("1/1d")
    make_customer(first_name="Amina")
    first = make_campaign()
    client.post(f"/campaigns/{first.id}/send", json={"audience": {"all": True}})
    work()
    second = make_campaign()
    response = client.post(f"/campaigns/{second.id}/send", json={"audience": {"all": True}})
    assert response.status_code == 422
    assert response.get_json()["skipped_frequency_cap"] == 1


def test_a_campaign_created_with_ignore_frequency_cap_shows_it(client):
    body = {"name": "Code", "channel": "sms", "base_template": "Your code", "ignore_frequency_cap": True}
    assert client.post("/campaigns", json=body).get_json()["ignore_frequency_cap"] is True
    body.pop("ignore_frequency_cap")
    assert client.post("/campaigns", json=body).get_json()["ignore_frequency_cap"] is False


def _ids() -> list[int]:
    return sorted(db.session.scalars(select(Customer.id)))


def test_a_segment_whose_filter_changes_before_the_campaign_fires_sends_to_the_new_filter(client, clock, work):
    make_customer(first_name="Amina", attributes={"tier": "gold"})
    make_customer(first_name="Brian", attributes={"tier": "silver"})
    segment = save(client)
    at = clock.now() + timedelta(hours=1)
    body = {"name": "Later", "channel": "sms", "base_template": "Hi {first_name}", "scheduled_at": at.isoformat()}
    campaign = client.post("/campaigns", json=body).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"audience": {"segment_id": segment["id"]}})
    silver = {"field": "attributes.tier", "op": "eq", "value": "silver"}
    assert client.patch(f"/segments/{segment['id']}", json={"filter": silver}).status_code == 200
    clock.advance(hours=1)
    fire(campaign["id"], work)
    assert recipients_of(campaign["id"]) == ["Brian"]
