"""Customer attributes: set on create, merged by PATCH, listed, imported from typed CSV columns."""

from __future__ import annotations

from sqlalchemy import select

from app.extensions import db
from app.models import Customer


def create(client, **body):
    response = client.post("/customers", json={"phone": "0712000001", **body})
    return response


def import_csv(client, body: str) -> dict:
    response = client.post("/customers/import", data=body, content_type="text/csv")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def stored(phone: str) -> Customer:
    db.session.expire_all()
    return db.session.scalar(select(Customer).where(Customer.phone == phone))


def test_attributes_are_stored_and_shown_with_the_customer(client):
    response = create(client, attributes={"tier": "gold", "spend": 1250.5, "orders": 3, "vip": True})
    assert response.status_code == 201, response.get_json()
    customer = response.get_json()
    assert customer["attributes"] == {"tier": "gold", "spend": 1250.5, "orders": 3, "vip": True}
    assert customer["country"] == "KE"
    assert client.get(f"/customers/{customer['id']}").get_json()["attributes"]["tier"] == "gold"
    listed = client.get("/customers").get_json()["data"]
    assert listed[0]["attributes"] == customer["attributes"]


def test_a_customer_without_attributes_has_an_empty_object(client):
    assert create(client).get_json()["attributes"] == {}


def test_patch_merges_attributes_and_null_removes_a_key(client):
    customer = create(client, attributes={"tier": "gold", "city_zone": "west", "spend": 10}).get_json()
    response = client.patch(f"/customers/{customer['id']}", json={"attributes": {"tier": "silver", "city_zone": None}})
    assert response.status_code == 200
    assert response.get_json()["attributes"] == {"tier": "silver", "spend": 10}
    # A PATCH without attributes leaves them as they are.
    response = client.patch(f"/customers/{customer['id']}", json={"first_name": "Amina"})
    assert response.get_json()["attributes"] == {"tier": "silver", "spend": 10}


def test_bad_attribute_keys_and_values_are_named(client):
    response = create(
        client, attributes={"Tier": "gold", "ok": "x" * 501, "nested": {"a": 1}, "list": [1], "fine": "yes"}
    )
    assert response.status_code == 422
    errors = response.get_json()["errors"]
    assert set(errors) == {"attributes.Tier", "attributes.ok", "attributes.nested", "attributes.list"}
    assert "500 characters" in errors["attributes.ok"][0]
    assert stored("+254712000001") is None


def test_over_50_keys_or_8_kb_is_422_and_patch_counts_the_merged_whole(client):
    too_many = {f"k{n}": n for n in range(51)}
    response = create(client, attributes=too_many)
    assert response.status_code == 422 and "over the limit of 50" in response.get_json()["message"]
    big = {f"k{n}": "x" * 400 for n in range(21)}  # about 8.6 KB
    assert create(client, attributes=big).status_code == 422
    customer = create(client, attributes={f"k{n}": n for n in range(50)}).get_json()
    response = client.patch(f"/customers/{customer['id']}", json={"attributes": {"one_more": 1}})
    assert response.status_code == 422
    assert response.get_json()["errors"] == {"attributes": ["51 attributes, over the limit of 50"]}
    response = client.patch(f"/customers/{customer['id']}", json={"attributes": {"one_more": 1, "k0": None}})
    assert response.status_code == 200 and len(response.get_json()["attributes"]) == 50


def test_csv_columns_beyond_the_fields_are_typed_attributes(client):
    body = (
        "phone,first_name,Tier ,spend:number,vip:boolean,last_order:date\n"
        "0712000001,Amina,gold,1250.50,yes,2026-11-30\n"
        "0712000002,Brian,silver,7,no,\n"
    )
    report = import_csv(client, body)
    assert (report["created"], report["invalid"]) == (2, 0)
    assert stored("+254712000001").attributes == {
        "tier": "gold",
        "spend": 1250.5,
        "vip": True,
        "last_order": "2026-11-30",
    }
    assert stored("+254712000002").attributes == {"tier": "silver", "spend": 7, "vip": False}
    assert stored("+254712000002").country == "KE"


def test_an_import_merges_attributes_and_an_empty_cell_removes_one(client):
    customer = create(client, attributes={"tier": "gold", "kept": "yes", "spend": 3}).get_json()
    report = import_csv(client, "phone,tier,spend:number\n0712000001,silver,\n")
    assert (report["created"], report["updated"]) == (0, 1)
    assert client.get(f"/customers/{customer['id']}").get_json()["attributes"] == {"tier": "silver", "kept": "yes"}


def test_a_value_that_does_not_fit_its_type_rejects_its_row_only(client):
    body = (
        "phone,spend:number,vip:boolean,last_order:date\n"
        "0712000001,12x,yes,2026-01-01\n"
        "0712000002,5,maybe,2026-01-01\n"
        "0712000003,5,yes,2026-02-30\n"
        "0712000004,5,yes,2026-02-28\n"
    )
    report = import_csv(client, body)
    assert (report["created"], report["invalid"]) == (1, 3)
    assert [e["line"] for e in report["errors"]] == [2, 3, 4]
    assert "spend: '12x' is not a number" in report["errors"][0]["reason"]
    assert "vip:" in report["errors"][1]["reason"] and "last_order:" in report["errors"][2]["reason"]
    assert stored("+254712000001") is None
    assert stored("+254712000004").attributes == {"spend": 5, "vip": True, "last_order": "2026-02-28"}


def test_an_import_that_would_pass_the_limits_rejects_the_row(client):
    create(client, attributes={f"k{n}": n for n in range(50)})
    report = import_csv(client, "phone,first_name,extra\n0712000001,Amina,x\n0712000002,Brian,y\n")
    assert (report["created"], report["updated"], report["invalid"]) == (1, 0, 1)
    assert report["errors"] == [{"line": 2, "reason": "attributes: 51 attributes, over the limit of 50"}]
    assert "extra" not in stored("+254712000001").attributes
    assert stored("+254712000002").attributes == {"extra": "y"}


def test_a_header_that_cannot_be_an_attribute_imports_nothing(client):
    for header in ("phone,2tier", "phone,tier-level", "phone,spend:money", "phone,tier,TIER"):
        response = client.post("/customers/import", data=f"{header}\n0712000001,x\n", content_type="text/csv")
        assert response.status_code == 422, header
    assert stored("+254712000001") is None


TEMPLATE = "Hi {first_name|there}, your {attributes.tier|member} deal: {attributes.spend} spent"


def test_the_preview_the_estimate_and_the_send_render_attributes_and_fallbacks(client, work):
    from app.models import OutboundMessage
    from tests.factories import make_campaign, make_customer

    amina = make_customer(first_name="Amina", attributes={"tier": "gold", "spend": 1250.5})
    blank = make_customer(first_name="", attributes={})
    campaign = make_campaign(base_template=TEMPLATE)
    preview = client.post(f"/campaigns/{campaign.id}/personalized-preview", json={"customer_id": blank.id})
    assert preview.get_json()["rendered_message"] == "Hi there, your member deal: [unknown] spent"
    estimate = client.post(f"/campaigns/{campaign.id}/estimate", json={"customer_ids": [amina.id, blank.id]})
    assert estimate.get_json()["recipients"] == 2
    assert estimate.get_json()["by_encoding"]["GSM-7"]["messages"] == 2
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [amina.id, blank.id]}).status_code == 202
    work()
    bodies = dict(db.session.execute(select(OutboundMessage.customer_id, OutboundMessage.rendered_content)).all())
    assert bodies == {
        amina.id: "Hi Amina, your gold deal: 1250.5 spent",
        blank.id: "Hi there, your member deal: [unknown] spent",
    }


def test_a_template_with_an_unknown_field_is_refused_but_any_attribute_name_is_not(client):
    body = {"name": "x", "channel": "sms", "base_template": "Hi {attributes.anything} {nickname|x}"}
    response = client.post("/campaigns", json=body)
    assert response.status_code == 422
    assert response.get_json()["errors"]["base_template"][0].startswith("unknown placeholder {nickname|x}")
    body["base_template"] = "Hi {attributes.anything|friend}"
    assert client.post("/campaigns", json=body).status_code == 201
