"""The filter language through the API: every field and operator on the database the suite runs, groups and
`not` as an exact complement, engagement, opt-outs, the limits, and values that try to be SQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.models import Customer, CustomerOptOut, OutboundMessage
from tests.factories import make_campaign, make_customer


def matching(client, spec) -> set[str]:
    """The first names of the customers `spec` matches, through GET /customers?filter=."""
    response = client.get("/customers", query_string={"filter": json.dumps(spec), "page_size": 100})
    assert response.status_code == 200, response.get_json()
    return {c["first_name"] for c in response.get_json()["data"]}


def refused(client, spec) -> dict:
    response = client.get("/customers", query_string={"filter": json.dumps(spec)})
    assert response.status_code == 422, response.get_json()
    return response.get_json()["errors"]


@pytest.fixture
def people(app):
    """Five customers with a spread of fields and attributes."""
    make_customer(
        first_name="Amina",
        location="Nairobi",
        phone="+254711000001",
        country="KE",
        attributes={"tier": "Gold", "spend": 1250.5, "vip": True, "last_order": "2026-11-30"},
        created_at=datetime(2026, 1, 10, tzinfo=UTC),
    )
    make_customer(
        first_name="Brian",
        location="mombasa",
        phone="+254711000002",
        country="KE",
        attributes={"tier": "silver", "spend": 80, "vip": False, "last_order": "2026-06-01"},
        created_at=datetime(2026, 3, 1, tzinfo=UTC),
    )
    make_customer(
        first_name="Chen",
        location="Kampala",
        phone="+256772000003",
        country="UG",
        attributes={"tier": "bronze_50%", "spend": "lots"},
        created_at=datetime(2026, 5, 1, tzinfo=UTC),
    )
    make_customer(first_name="Dana", location=None, phone="+254711000004", country="KE", attributes={})
    make_customer(first_name="Esi", location="Kisumu", phone="+254711000005", country="KE", attributes={"spend": 3})


def cond(field, op, value=None):
    spec = {"field": field, "op": op}
    if value is not None:
        spec["value"] = value
    return spec


CASES = [
    # built-in text fields: without case
    (cond("location", "eq", "NAIROBI"), {"Amina"}),
    (cond("location", "ne", "nairobi"), {"Brian", "Chen", "Esi"}),  # Dana has none: no comparison matches
    (cond("location", "in", ["Mombasa", "kisumu"]), {"Brian", "Esi"}),
    (cond("location", "not_in", ["Mombasa", "kisumu"]), {"Amina", "Chen"}),
    (cond("location", "contains", "AMP"), {"Chen"}),
    (cond("location", "starts_with", "ki"), {"Esi"}),
    (cond("location", "gt", "m"), {"Amina", "Brian"}),
    (cond("location", "gte", "mombasa"), {"Amina", "Brian"}),
    (cond("location", "lt", "kisumu"), {"Chen"}),
    (cond("location", "lte", "kisumu"), {"Chen", "Esi"}),
    (cond("location", "exists"), {"Amina", "Brian", "Chen", "Esi"}),
    (cond("location", "missing"), {"Dana"}),
    (cond("phone", "starts_with", "+256"), {"Chen"}),
    (cond("country", "eq", "ug"), {"Chen"}),
    (cond("first_name", "in", ["amina", "DANA"]), {"Amina", "Dana"}),
    # times
    (cond("created_at", "lt", "2026-02-01"), {"Amina"}),
    (cond("created_at", "gte", "2026-03-01T00:00:00Z"), {"Brian", "Chen", "Dana", "Esi"}),
    # attributes: text without case, numbers as numbers, booleans, dates as YYYY-MM-DD text
    (cond("attributes.tier", "eq", "gold"), {"Amina"}),
    (cond("attributes.tier", "ne", "gold"), {"Brian", "Chen"}),
    (cond("attributes.tier", "in", ["GOLD", "silver"]), {"Amina", "Brian"}),
    (cond("attributes.tier", "not_in", ["gold"]), {"Brian", "Chen"}),
    (cond("attributes.tier", "contains", "_50%"), {"Chen"}),
    (cond("attributes.tier", "contains", "%"), {"Chen"}),  # a LIKE wildcard is a plain character
    (cond("attributes.tier", "starts_with", "s"), {"Brian"}),
    (cond("attributes.spend", "gt", 100), {"Amina"}),  # "lots" is text: never compared with a number
    (cond("attributes.spend", "gte", 80), {"Amina", "Brian"}),
    (cond("attributes.spend", "lt", 80), {"Esi"}),
    (cond("attributes.spend", "lte", 80), {"Brian", "Esi"}),
    (cond("attributes.spend", "eq", 1250.5), {"Amina"}),
    (cond("attributes.spend", "in", [3, 80]), {"Brian", "Esi"}),
    (cond("attributes.spend", "ne", 3), {"Amina", "Brian"}),
    (cond("attributes.spend", "eq", "lots"), {"Chen"}),
    (cond("attributes.vip", "eq", True), {"Amina"}),
    (cond("attributes.vip", "ne", True), {"Brian"}),
    (cond("attributes.vip", "in", [False]), {"Brian"}),
    (cond("attributes.last_order", "gt", "2026-07-01"), {"Amina"}),
    (cond("attributes.spend", "exists"), {"Amina", "Brian", "Chen", "Esi"}),
    (cond("attributes.tier", "missing"), {"Dana", "Esi"}),
    # groups
    ({"all": [cond("country", "eq", "KE"), cond("attributes.spend", "gt", 50)]}, {"Amina", "Brian"}),
    ({"any": [cond("location", "eq", "Kampala"), cond("attributes.vip", "eq", False)]}, {"Brian", "Chen"}),
    ({"not": cond("attributes.tier", "eq", "gold")}, {"Brian", "Chen", "Dana", "Esi"}),
    ({"not": cond("location", "ne", "nairobi")}, {"Amina", "Dana"}),
    (
        {"not": {"any": [cond("attributes.spend", "gt", 10), cond("location", "eq", "kisumu")]}},
        {"Chen", "Dana"},
    ),
    ({"not": {"not": cond("attributes.tier", "eq", "gold")}}, {"Amina"}),
]


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_every_operator_matches_what_it_says(client, people, spec, expected):
    assert matching(client, spec) == expected


def test_not_is_the_exact_complement_of_every_case(client, people):
    everyone = {"Amina", "Brian", "Chen", "Dana", "Esi"}
    for spec, expected in CASES:
        assert matching(client, {"not": spec}) == everyone - expected, spec


def test_engagement_and_opt_out_filters(client, people, clock):
    ids = dict(db.session.execute(select(Customer.first_name, Customer.id)).all())
    campaign = make_campaign()
    now = clock.now()
    rows = [
        ("Amina", "delivered", now - timedelta(days=2), now),
        ("Brian", "sent", now - timedelta(days=10), None),
        ("Chen", "failed", None, None),
    ]
    for name, status, sent_at, read_at in rows:
        db.session.add(
            OutboundMessage(
                campaign_id=campaign.id, customer_id=ids[name], status=status, sent_at=sent_at, read_at=read_at
            )
        )
    db.session.add(CustomerOptOut(customer_id=ids["Dana"], channel="sms", source="api"))
    db.session.commit()

    def event(e):
        return {"campaign": campaign.id, "event": e}

    assert matching(client, event("sent")) == {"Amina", "Brian"}
    assert matching(client, event("delivered")) == {"Amina"}
    assert matching(client, event("read")) == {"Amina"}
    assert matching(client, event("failed")) == {"Chen"}
    assert matching(client, event("not_sent")) == {"Chen", "Dana", "Esi"}
    assert matching(client, {"all": [event("delivered"), {"not": event("read")}]}) == set()
    assert matching(client, {"messaged_within": "7d"}) == {"Amina"}
    assert matching(client, {"messaged_within": "239h"}) == {"Amina"}
    assert matching(client, {"messaged_within": "11d"}) == {"Amina", "Brian"}
    assert matching(client, {"opted_out": "sms"}) == {"Dana"}
    assert matching(client, {"not": {"opted_out": "sms"}}) == {"Amina", "Brian", "Chen", "Esi"}


def test_a_bad_filter_names_its_dotted_path(client):
    assert set(
        refused(
            client, {"all": [cond("location", "eq", "x"), cond("location", "eq", "y"), cond("location", "like", "z")]}
        )
    ) == {"filter.all.2.op"}
    assert set(refused(client, {"any": [{"field": "password", "op": "eq", "value": "x"}]})) == {"filter.any.0.field"}
    assert set(refused(client, cond("attributes.Tier", "eq", "x"))) == {"filter.field"}
    assert set(refused(client, cond("location", "eq", 3))) == {"filter.value"}
    assert set(refused(client, cond("location", "in", ["a", 1]))) == {"filter.value"}
    assert set(refused(client, cond("location", "exists", "x"))) == {"filter.value"}
    assert set(refused(client, cond("attributes.vip", "gt", True))) == {"filter.value"}
    assert set(refused(client, cond("created_at", "gt", "yesterday"))) == {"filter.value"}
    assert set(refused(client, {"not": {"campaign": 1, "event": "opened"}})) == {"filter.not.event"}
    assert set(refused(client, {"messaged_within": "7w"})) == {"filter.messaged_within"}
    assert set(refused(client, {"opted_out": "email"})) == {"filter.opted_out"}
    assert set(refused(client, {"all": []})) == {"filter.all"}
    assert set(refused(client, {"every": []})) == {"filter"}
    response = client.get("/customers", query_string={"filter": "{not json"})
    assert response.status_code == 422 and set(response.get_json()["errors"]) == {"filter"}


def counted(client, spec) -> tuple[int, dict]:
    """POST /audiences/count of `spec` (a body: no length limit of a URL): its status and answer."""
    response = client.post("/audiences/count", json={"filter": spec})
    return response.status_code, response.get_json()


def test_the_limits_depth_conditions_and_values(client, people):
    deep = cond("location", "eq", "nairobi")
    for _ in range(4):
        deep = {"not": deep}
    assert matching(client, deep) == {"Amina"}  # 5 levels
    errors = refused(client, {"not": deep})
    assert errors == {"filter.not.not.not.not.not": ["nested deeper than 5 levels"]}
    status, answer = counted(
        client, {"any": [cond("location", "eq", f"x{n}") for n in range(49)] + [deep["not"]["not"]]}
    )
    assert (status, answer["customers"]) == (200, 1)  # 50 conditions
    status, answer = counted(client, {"any": [cond("location", "eq", f"x{n}") for n in range(51)]})
    assert (status, answer["errors"]) == (422, {"filter.any.50": ["more than 50 conditions in the filter"]})
    status, answer = counted(client, cond("location", "in", [f"x{n}" for n in range(999)] + ["nairobi"]))
    assert (status, answer["customers"]) == (200, 1)  # 1,000 values
    status, answer = counted(client, cond("location", "in", [f"x{n}" for n in range(1001)]))
    assert (status, answer["errors"]) == (422, {"filter.value": ["1001 values, over the limit of 1000"]})
    status, answer = counted(client, cond("location", "eq", "x" * 501))
    assert (status, answer["errors"]) == (422, {"filter.value": ["longer than 500 characters"]})
    response = client.get("/customers", query_string={"filter": json.dumps(cond("location", "in", ["x" * 400] * 10))})
    assert response.status_code == 422 and set(response.get_json()["errors"]) == {"filter"}  # over 4,000 characters


INJECTIONS = [
    "x' OR '1'='1",
    "'; DROP TABLE customers; --",
    'x") OR 1=1 --',
    "$.tier') OR 1=1 --",
    "%' OR 1=1 --",
]


@pytest.mark.parametrize("attack", INJECTIONS)
def test_values_that_try_to_be_sql_are_only_values(client, people, attack):
    for spec in (
        cond("location", "eq", attack),
        cond("location", "in", [attack, "nope"]),
        cond("first_name", "contains", attack),
        cond("phone", "starts_with", attack),
        cond("attributes.tier", "eq", attack),
        cond("attributes.tier", "not_in", [attack]),
        {"not": cond("attributes.tier", "lt", attack)},
    ):
        names = matching(client, spec)
        # Nothing has these values; `not_in`/`not` match the customers they should and no one more.
        assert names <= {"Amina", "Brian", "Chen", "Dana", "Esi"}
    assert matching(client, cond("location", "eq", attack)) == set()
    assert matching(client, cond("attributes.tier", "not_in", [attack])) == {"Amina", "Brian", "Chen"}
    # Strings where a name or a keyword goes are refused, never run.
    for spec, path in (
        ({"field": attack, "op": "eq", "value": "x"}, "filter.field"),
        ({"field": "attributes." + attack, "op": "eq", "value": "x"}, "filter.field"),
        ({"field": "location", "op": attack, "value": "x"}, "filter.op"),
        ({"campaign": 1, "event": attack}, "filter.event"),
        ({"messaged_within": attack}, "filter.messaged_within"),
        ({"opted_out": attack}, "filter.opted_out"),
        ({"field": "created_at", "op": "gt", "value": attack}, "filter.value"),
    ):
        assert set(refused(client, spec)) == {path}
    assert db.session.scalar(select(func.count()).select_from(Customer)) == 5


def test_send_and_estimate_take_a_filter_audience(client, people):
    campaign = make_campaign()
    audience = {"audience": {"filter": {"all": [cond("country", "eq", "KE"), cond("attributes.spend", "gte", 80)]}}}
    assert client.post(f"/campaigns/{campaign.id}/estimate", json=audience).get_json()["recipients"] == 2
    response = client.post(f"/campaigns/{campaign.id}/send", json=audience)
    assert response.status_code == 202, response.get_json()
    names = db.session.scalars(
        select(Customer.first_name).join(OutboundMessage, OutboundMessage.customer_id == Customer.id)
    ).all()
    assert sorted(names) == ["Amina", "Brian"]
    bad = {"audience": {"filter": {"all": [cond("location", "eq", "x"), {"field": "location", "op": "near"}]}}}
    response = client.post(f"/campaigns/{campaign.id}/send", json=bad)
    assert response.status_code == 422
    assert set(response.get_json()["errors"]) == {"audience.filter.all.1.op"}
