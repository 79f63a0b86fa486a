import pytest

from tests.factories import make_campaign, make_customer
from tests.helpers import stats

TEMPLATE = "Hi {first_name}, check out {preferred_product}"


def create(client, **fields):
    return client.post("/campaigns", json={"name": "Launch", "channel": "sms", "base_template": TEMPLATE, **fields})


def test_create_campaign_is_draft_with_empty_stats(client):
    response = create(client)
    assert response.status_code == 201
    body = response.get_json()
    assert body["status"] == "draft"
    assert body["stats"] == stats(total=0)
    assert client.get(f"/campaigns/{body['id']}").get_json()["name"] == "Launch"


def test_unknown_placeholder_is_named(client):
    response = create(client, base_template="Hi {nickname}, see {first_name}")
    assert response.status_code == 422
    assert "{nickname}" in response.get_json()["message"]
    assert client.get("/campaigns").get_json()["pagination"]["total"] == 0


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"channel": "fax"}, "channel"),
        ({"name": ""}, "name"),
        ({"base_template": 42}, "base_template"),
        ({"scheduled_at": "tomorrow"}, "scheduled_at"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, fields, named):
    response = create(client, **fields)
    assert response.status_code == 422
    assert named in response.get_json()["message"]


@pytest.mark.parametrize("channel, limit", [("sms", 1600), ("whatsapp", 4096)])
def test_template_over_channel_limit_is_422(client, channel, limit):
    assert create(client, channel=channel, base_template="x" * limit).status_code == 201
    response = create(client, channel=channel, base_template="x" * (limit + 1))
    assert response.status_code == 422
    assert f"limit of {limit}" in response.get_json()["message"]


def test_patch_draft_campaign(client):
    campaign = make_campaign()
    response = client.patch(f"/campaigns/{campaign.id}", json={"name": "Renamed", "channel": "whatsapp"})
    assert response.status_code == 200
    assert response.get_json()["name"] == "Renamed"
    assert response.get_json()["channel"] == "whatsapp"


def test_patch_checks_template_against_current_channel(client):
    campaign = make_campaign(channel="whatsapp", base_template="x" * 2000)
    response = client.patch(f"/campaigns/{campaign.id}", json={"channel": "sms"})
    assert response.status_code == 422


@pytest.mark.parametrize("status", ["sending", "paused", "sent", "failed", "canceled"])
def test_patch_after_sending_started_is_409(client, status):
    campaign = make_campaign(status=status)
    response = client.patch(f"/campaigns/{campaign.id}", json={"name": "Nope"})
    assert response.status_code == 409
    assert response.get_json()["campaign_status"] == status
    assert client.get(f"/campaigns/{campaign.id}").get_json()["name"] == "Spring sale"


def test_list_is_newest_first_and_paginated(client):
    ids = [make_campaign(name=f"c{i}").id for i in range(25)]
    first = client.get("/campaigns").get_json()
    assert [c["id"] for c in first["data"]] == ids[::-1][:20]
    assert first["pagination"] == {
        "page": 1,
        "page_size": 20,
        "total": 25,
        "total_pages": 2,
        "next_cursor": first["pagination"]["next_cursor"],
    }
    second = client.get("/campaigns?page=2").get_json()
    assert [c["id"] for c in second["data"]] == ids[::-1][20:]
    assert second["pagination"]["next_cursor"] is None  # the last page
    assert [c["id"] for c in client.get("/campaigns?page=3&page_size=10").get_json()["data"]] == ids[4::-1]
    assert client.get("/campaigns?page=9").get_json()["data"] == []


def test_offset_pages_shift_when_campaigns_are_added(client):
    """What page numbers guarantee: a total order (id DESC), not stability. A campaign created between two
    page requests moves every later row down one place, so the row at the end of page 1 is also at the
    start of page 2 (README, "Pagination")."""
    ids = [make_campaign().id for _ in range(4)]
    page1 = [c["id"] for c in client.get("/campaigns?page_size=2").get_json()["data"]]
    assert page1 == [ids[3], ids[2]]
    make_campaign()
    page2 = [c["id"] for c in client.get("/campaigns?page_size=2&page=2").get_json()["data"]]
    assert page2 == [ids[2], ids[1]]


def test_list_filters_by_status_and_channel(client):
    a = make_campaign(status="sent", channel="sms")
    make_campaign(status="sent", channel="whatsapp")
    make_campaign(status="draft", channel="sms")
    body = client.get("/campaigns?status=sent&channel=sms").get_json()
    assert [c["id"] for c in body["data"]] == [a.id]


@pytest.mark.parametrize(
    "query",
    [
        "page=0",
        "page=-1",
        "page=abc",
        "page_size=0",
        "page_size=101",
        "page_size=1.5",
        "status=bogus",
        "channel=fax",
        "page=99999999999999999999999",
    ],
)
def test_bad_list_parameters_are_422(client, query):
    response = client.get(f"/campaigns?{query}")
    assert response.status_code == 422
    assert response.get_json()["message"].startswith("Invalid request")


def test_preview_renders_without_storing_or_queueing(client, app, redis_conn):
    customer = make_customer(first_name="  ", preferred_product="Shoes")
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/personalized-preview", json={"customer_id": customer.id})
    assert response.status_code == 200
    assert response.get_json() == {
        "campaign_id": campaign.id,
        "customer_id": customer.id,
        "rendered_message": "Hi [unknown], check out Shoes",
        "links": [],
        "encoding": "GSM-7",
        "characters": 29,
        "units": 31,  # `[` and `]` are GSM-7 extension characters: two septets each
        "segments": 1,
        "non_gsm_characters": [],
    }
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["total"] == 0
    assert redis_conn.keys("rq:queue:*") == []


def test_preview_unknown_campaign_or_customer_is_404(client):
    customer = make_customer()
    campaign = make_campaign()
    assert client.post("/campaigns/999/personalized-preview", json={"customer_id": customer.id}).status_code == 404
    response = client.post(f"/campaigns/{campaign.id}/personalized-preview", json={"customer_id": 999})
    assert response.status_code == 404
    assert "customer 999" in response.get_json()["message"]


def test_messages_of_unknown_campaign_is_404(client):
    assert client.get("/campaigns/999/messages").status_code == 404
