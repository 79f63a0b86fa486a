"""Opt-outs: customers who opt out of a channel (a STOP reply, the provider, the API, an import) are never
messaged there; an opt-in keyword or the API brings them back. Inbound messages come signed from the local
fake providers to the served app, as the real providers post them."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.customers.optouts import inbound_phone, not_opted_out
from app.extensions import db
from app.models import Customer, CustomerOptOut, OutboundMessage
from config import SettingsError, check_settings
from tests.factories import make_campaign, make_customer
from tests.fake_providers import accept, refuse


def opt_outs(customer_id: int) -> dict[str, str]:
    """The customer's opt-outs as stored: channel -> source."""
    db.session.expire_all()
    rows = db.session.scalars(select(CustomerOptOut).where(CustomerOptOut.customer_id == customer_id))
    return {row.channel: row.source for row in rows}


def send(client, campaign_id: int, **body) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/send", json=body)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def statuses(campaign_id: int) -> dict[int, tuple[str, str | None]]:
    db.session.expire_all()
    rows = db.session.scalars(select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id))
    return {row.customer_id: (row.status, row.last_error) for row in rows}


# -- inbound messages, per provider


def test_africas_talking_stop_and_start_opt_the_sender_out_and_back_in(app, use_provider, fake_providers):
    use_provider("africastalking")
    customer = make_customer()
    answer = fake_providers.africastalking_inbound(customer.phone, "  stop \n")
    assert answer.status == 200, answer.body
    assert answer.json() == {"opted_out": 1, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0}
    assert opt_outs(customer.id) == {"sms": "keyword"}
    assert fake_providers.africastalking_inbound(customer.phone, "Start").json()["opted_in"] == 1
    assert opt_outs(customer.id) == {}


def test_africas_talking_opt_out_notification_opts_out_of_sms(app, use_provider, fake_providers):
    use_provider("africastalking")
    customer = make_customer()
    answer = fake_providers.africastalking_opt_out(customer.phone)
    assert (answer.status, answer.json()["opted_out"]) == (200, 1)
    assert opt_outs(customer.id) == {"sms": "provider"}


def test_twilio_inbound_stop_signed_by_twilio_opts_out(app, use_provider, fake_providers):
    use_provider("twilio")
    customer = make_customer()
    answer = fake_providers.twilio_inbound(customer.phone, "UNSUBSCRIBE")
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"].startswith("text/xml")
    assert "<Response></Response>" in answer.body
    assert opt_outs(customer.id) == {"sms": "keyword"}
    fake_providers.twilio_inbound(customer.phone, "unstop")
    assert opt_outs(customer.id) == {}


def test_whatsapp_messages_opt_out_of_whatsapp_only_beside_statuses_in_one_post(
    app, client, use_provider, fake_providers, work
):
    use_provider("whatsapp_cloud")
    fake_providers.auto_receipts = {}
    customer, other = make_customer(), make_customer()
    campaign = make_campaign(channel="whatsapp", base_template="Hi {first_name}")
    send(client, campaign.id, customer_ids=[other.id])
    work()
    [request] = fake_providers.requests("whatsapp")
    wa_id = customer.phone.lstrip("+")  # WhatsApp numbers come without the plus
    answer = fake_providers.whatsapp_inbound(
        [(wa_id, "Stop"), (other.phone.lstrip("+"), "thanks!")], statuses=[(request.message_id, "delivered")]
    )
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["inbound"] == {"opted_out": 1, "opted_in": 0, "ignored": 1, "invalid": 0, "deferred": 0}
    assert body["applied"] == 1  # the status in the same post is a receipt as ever
    assert opt_outs(customer.id) == {"whatsapp": "keyword"}
    assert opt_outs(other.id) == {}
    fake_providers.whatsapp_inbound([(wa_id, "START")])
    assert opt_outs(customer.id) == {}


@pytest.mark.parametrize("text", ["STOP please", "hello", "", "STO P", "START STOP"])
def test_text_that_is_not_exactly_a_keyword_is_ignored(app, use_provider, fake_providers, text):
    use_provider("africastalking")
    customer = make_customer()
    answer = fake_providers.africastalking_inbound(customer.phone, text)
    assert (answer.status, answer.json()) == (
        200,
        {"opted_out": 0, "opted_in": 0, "ignored": 1, "invalid": 0, "deferred": 0},
    )
    assert opt_outs(customer.id) == {}


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("STOP\u200b", "opted_out"),  # a zero-width space after it
        ("\ufeffSTOP", "opted_out"),  # a byte order mark before it
        ("S\u200dT\u200cOP", "opted_out"),  # zero-width joiners inside it
        ("\u2066stop\u2069", "opted_out"),  # a bidirectional isolate around it
        ("ＳＴＯＰ", "opted_out"),  # fullwidth
        (" ｓｔｏｐ\u00a0", "opted_out"),  # fullwidth, lower case, a no-break space after it
        ("ＳＴＡＲＴ\u00ad", "opted_in"),  # fullwidth, a soft hyphen after it
    ],
)
def test_keywords_are_recognised_through_invisible_and_fullwidth_characters(
    app, use_provider, fake_providers, text, action
):
    use_provider("africastalking")
    customer = make_customer()
    if action == "opted_in":
        fake_providers.africastalking_inbound(customer.phone, "STOP")
    answer = fake_providers.africastalking_inbound(customer.phone, text)
    assert (answer.status, answer.json()[action]) == (200, 1), answer.body
    assert opt_outs(customer.id) == ({"sms": "keyword"} if action == "opted_out" else {})
    whatsapp = fake_providers.whatsapp_inbound([(customer.phone.lstrip("+"), text)])
    assert whatsapp.json()["inbound"][action] == 1


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("+254711000222", "+254711000222"),  # Twilio, Africa's Talking
        ("254711000222", "+254711000222"),  # WhatsApp
        (" 0711000222 ", "+254711000222"),  # national, in DEFAULT_PHONE_REGION
        ("", None),
        ("STOP", None),
        ("12", None),
    ],
)
def test_inbound_numbers_are_matched_in_e164(app, given, stored):
    assert inbound_phone(given) == stored


def test_an_unknown_number_is_answered_200_and_ignored(app, use_provider, fake_providers):
    use_provider("twilio")
    customer = make_customer()
    assert fake_providers.twilio_inbound("+254799999999", "STOP").status == 200
    answer = fake_providers.africastalking_inbound("not a number", "STOP")
    assert (answer.status, answer.json()["ignored"]) == (200, 1)
    assert fake_providers.africastalking_opt_out("+254799999999").json()["ignored"] == 1
    assert fake_providers.whatsapp_inbound([("254799999999", "STOP")]).json()["inbound"]["ignored"] == 1
    assert db.session.scalar(select(CustomerOptOut.customer_id)) is None
    assert opt_outs(customer.id) == {}


def test_wrong_signature_or_token_is_403_and_changes_nothing(app, use_provider, fake_providers):
    use_provider("twilio")
    customer = make_customer()
    phone = customer.phone
    refused = [
        fake_providers.africastalking_inbound(phone, "STOP", token="wrong"),
        fake_providers.africastalking_inbound(phone, "STOP", token=None),
        fake_providers.africastalking_opt_out(phone, token="wrong"),
        fake_providers.twilio_inbound(phone, "STOP", auth_token="not-the-token"),
        fake_providers.twilio_inbound(phone, "STOP", sign=False),
        fake_providers.whatsapp_inbound([(phone.lstrip("+"), "STOP")], app_secret="not-the-secret"),
        fake_providers.whatsapp_inbound([(phone.lstrip("+"), "STOP")], sign=False),
    ]
    for answer in refused:
        assert answer.status == 403, (answer.url, answer.body)
        assert answer.json()["code"] == 403 and "webhook" in answer.json()["message"]
    assert opt_outs(customer.id) == {}


def test_keywords_come_from_the_settings(app, use_provider, fake_providers):
    use_provider("africastalking", OPT_OUT_KEYWORDS=["ACHA"], OPT_IN_KEYWORDS=["ANZA"])
    customer = make_customer()
    assert fake_providers.africastalking_inbound(customer.phone, "stop").json()["ignored"] == 1
    assert fake_providers.africastalking_inbound(customer.phone, "acha").json()["opted_out"] == 1
    assert opt_outs(customer.id) == {"sms": "keyword"}


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"OPT_OUT_KEYWORDS": ",, "}, "OPT_OUT_KEYWORDS: must name at least one keyword"),
        ({"OPT_IN_KEYWORDS": "START,GO ON"}, "OPT_IN_KEYWORDS: keywords are single words"),
        ({"OPT_IN_KEYWORDS": "start,stop"}, "OPT_IN_KEYWORDS: STOP is also in OPT_OUT_KEYWORDS"),
    ],
)
def test_keyword_settings_are_checked(app, settings, problem):
    from config import SETTINGS

    config = dict(app.config)
    for setting in SETTINGS:
        if setting.name in settings:
            config[setting.config_key] = setting.load(settings)
    with pytest.raises(SettingsError, match=problem):
        check_settings(config)


# -- the API


def test_api_opt_out_and_in_are_idempotent_and_shown_with_the_customer(app, client):
    customer = make_customer()
    first = client.post(f"/customers/{customer.id}/opt-out", json={"channel": "sms"})
    assert first.status_code == 200, first.get_json()
    shown = first.get_json()["opt_outs"]
    assert list(shown) == ["sms"] and shown["sms"]["source"] == "api"
    again = client.post(f"/customers/{customer.id}/opt-out", json={"channel": "sms"})
    assert again.get_json()["opt_outs"] == shown  # the first time and source are kept
    assert client.get(f"/customers/{customer.id}").get_json()["opt_outs"] == shown
    for _ in range(2):
        back = client.post(f"/customers/{customer.id}/opt-in", json={"channel": "sms"})
        assert (back.status_code, back.get_json()["opt_outs"]) == (200, {})


def test_api_opt_out_keeps_an_earlier_keyword_opt_out(app, client):
    customer = make_customer()
    db.session.add(CustomerOptOut(customer_id=customer.id, channel="whatsapp", source="keyword"))
    db.session.commit()
    answer = client.post(f"/customers/{customer.id}/opt-out", json={"channel": "whatsapp"}).get_json()
    assert answer["opt_outs"]["whatsapp"]["source"] == "keyword"


@pytest.mark.parametrize(
    ("path", "body", "code", "field"),
    [
        ("/customers/999999/opt-out", {"channel": "sms"}, 404, None),
        ("/customers/{id}/opt-out", {"channel": "email"}, 422, "channel"),
        ("/customers/{id}/opt-in", {}, 422, "channel"),
        ("/customers/{id}/opt-out", {"channel": "sms", "extra": 1}, 422, "extra"),
    ],
)
def test_bad_opt_out_requests_are_errors_naming_what_is_wrong(app, client, path, body, code, field):
    customer = make_customer()
    answer = client.post(path.format(id=customer.id), json=body)
    assert answer.status_code == code, answer.get_json()
    if field:
        assert field in answer.get_json()["errors"]


def test_customers_filter_by_opted_out_channel(app, client):
    sms_only, both, none = make_customer(), make_customer(), make_customer()
    for customer_id, channel in ((sms_only.id, "sms"), (both.id, "sms"), (both.id, "whatsapp")):
        client.post(f"/customers/{customer_id}/opt-out", json={"channel": channel})
    ids = lambda channel: [c["id"] for c in client.get(f"/customers?opted_out={channel}").get_json()["data"]]  # noqa: E731
    assert ids("sms") == [both.id, sms_only.id]
    assert ids("whatsapp") == [both.id]
    assert none.id in [c["id"] for c in client.get("/customers").get_json()["data"]]
    bad = client.get("/customers?opted_out=email")
    assert bad.status_code == 422 and "opted_out" in bad.get_json()["errors"]


# -- imports


def import_csv(client, text: str) -> dict:
    response = client.post("/customers/import", data=text.encode(), content_type="text/csv")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_import_columns_opt_out_opt_in_or_keep(app, client):
    kept = make_customer()
    client.post(f"/customers/{kept.id}/opt-out", json={"channel": "sms"})
    back = make_customer()
    client.post(f"/customers/{back.id}/opt-out", json={"channel": "whatsapp"})
    report = import_csv(
        client,
        "phone,first_name,opted_out_sms,opted_out_whatsapp\n"
        "+254711000101,Amina,true,\n"
        f"{kept.phone},,,YES\n"
        f"{back.phone},,0,no\n"
        "+254711000102,Baraka,1,maybe\n",
    )
    assert (report["created"], report["updated"], report["invalid"]) == (1, 2, 1)
    assert report["errors"] == [{"line": 5, "reason": "opted_out_whatsapp: 'maybe' is not one of true/false, "
                                 "1/0, yes/no (or empty)"}]  # fmt: skip
    new = db.session.scalar(select(Customer.id).where(Customer.phone == "+254711000101"))
    assert opt_outs(new) == {"sms": "import"}
    assert opt_outs(kept.id) == {"sms": "api", "whatsapp": "import"}  # empty keeps sms as it was
    assert opt_outs(back.id) == {}
    assert db.session.scalar(select(Customer.id).where(Customer.phone == "+254711000102")) is None


# -- sending


def test_send_by_ids_skips_opted_out_customers_and_counts_them(app, client, work):
    customers = [make_customer() for _ in range(3)]
    client.post(f"/customers/{customers[0].id}/opt-out", json={"channel": "sms"})
    client.post(f"/customers/{customers[1].id}/opt-out", json={"channel": "whatsapp"})  # not this channel
    campaign = make_campaign(channel="sms")
    answer = send(client, campaign.id, customer_ids=[c.id for c in customers])
    assert (answer["messages_queued"], answer["skipped_opted_out"]) == (2, 1)
    work()
    assert set(statuses(campaign.id)) == {customers[1].id, customers[2].id}


def test_audience_send_excludes_opted_out_in_its_insert(app, client, work):
    nairobi = [make_customer(location="Nairobi") for _ in range(4)]
    elsewhere = make_customer(location="Mombasa")
    for customer in (nairobi[0], nairobi[1], elsewhere):
        client.post(f"/customers/{customer.id}/opt-out", json={"channel": "whatsapp"})
    campaign = make_campaign(channel="whatsapp", base_template="Hi {first_name}")
    answer = send(client, campaign.id, audience={"location": "Nairobi"})
    assert (answer["messages_queued"], answer["skipped_opted_out"]) == (2, 2)
    assert set(statuses(campaign.id)) == {nairobi[2].id, nairobi[3].id}
    # The same filter, reusable by anything that counts recipients.
    may = db.session.scalars(select(Customer.id).where(Customer.location == "Nairobi", not_opted_out("whatsapp")))
    assert set(may) == {nairobi[2].id, nairobi[3].id}


def test_a_send_to_nobody_but_opted_out_customers_is_422(app, client):
    customer = make_customer()
    client.post(f"/customers/{customer.id}/opt-out", json={"channel": "sms"})
    campaign = make_campaign(channel="sms")
    answer = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [customer.id]})
    assert answer.status_code == 422
    assert answer.get_json()["skipped_opted_out"] == 1 and "opted out" in answer.get_json()["message"]


def test_a_queued_message_whose_customer_opts_out_is_canceled_without_the_provider(
    app, client, use_provider, fake_providers, work
):
    use_provider("africastalking")
    leaving, staying = make_customer(), make_customer()
    campaign = make_campaign(channel="sms", base_template="Hi {first_name}")
    send(client, campaign.id, customer_ids=[leaving.id, staying.id])  # queued, not yet run
    fake_providers.africastalking_inbound(leaving.phone, "STOP")
    work()
    assert statuses(campaign.id) == {leaving.id: ("canceled", "recipient opted out"), staying.id: ("sent", None)}
    assert [r.params["to"] for r in fake_providers.requests("africastalking")] == [staying.phone]
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent"


def test_opted_out_of_sms_still_gets_whatsapp(app, client, use_provider, fake_providers, work):
    use_provider("whatsapp_cloud")
    customer = make_customer()
    client.post(f"/customers/{customer.id}/opt-out", json={"channel": "sms"})
    campaign = make_campaign(channel="whatsapp", base_template="Hi {first_name}")
    answer = send(client, campaign.id, customer_ids=[customer.id])
    assert answer["skipped_opted_out"] == 0
    work()
    assert statuses(campaign.id) == {customer.id: ("sent", None)}
    assert len(fake_providers.requests("whatsapp")) == 1


def test_twilio_21610_at_send_time_opts_the_customer_out_of_sms(app, client, use_provider, fake_providers, work):
    use_provider("twilio")
    replied_stop, fine = make_customer(), make_customer()
    fake_providers.script("twilio", replied_stop.phone, refuse(21610))
    fake_providers.script("twilio", fine.phone, accept())
    campaign = make_campaign(channel="sms", base_template="Hi {first_name}")
    send(client, campaign.id, customer_ids=[replied_stop.id, fine.id])
    work()
    status, error = statuses(campaign.id)[replied_stop.id]
    assert status == "failed" and "21610" in error
    assert opt_outs(replied_stop.id) == {"sms": "provider"}
    assert opt_outs(fine.id) == {}
    # The next campaign leaves them out before reaching Twilio.
    fake_providers.clear()
    later = make_campaign(channel="sms", base_template="Hi again")
    assert send(client, later.id, customer_ids=[replied_stop.id, fine.id])["skipped_opted_out"] == 1
    work()
    assert [r.params["To"] for r in fake_providers.requests("twilio")] == [fine.phone]


def test_deleting_a_customer_deletes_their_opt_outs(app, client):
    customer = make_customer()
    client.post(f"/customers/{customer.id}/opt-out", json={"channel": "sms"})
    assert client.delete(f"/customers/{customer.id}").status_code == 204
    assert opt_outs(customer.id) == {}


def test_an_import_run_as_a_job_takes_the_opt_out_columns(app, client, work):
    app.config["IMPORT_SYNC_MAX_BYTES"] = 1000
    app.config["IMPORT_BATCH_SIZE"] = 50
    lines = [f"+2547115{n:05d},{'yes' if n % 3 == 0 else ''},{'1' if n % 5 == 0 else 'no'}" for n in range(120)]
    body = "phone,opted_out_sms,opted_out_whatsapp\n" + "\n".join(lines) + "\n"
    response = client.post("/customers/import", data=body.encode(), content_type="text/csv")
    assert response.status_code == 202, response.get_json()
    work()
    done = client.get(response.headers["Location"]).get_json()
    assert (done["status"], done["report"]["created"], done["report"]["invalid"]) == ("done", 120, 0)
    sms = client.get("/customers?opted_out=sms&page_size=100").get_json()["pagination"]["total"]
    whatsapp = client.get("/customers?opted_out=whatsapp&page_size=100").get_json()["pagination"]["total"]
    assert (sms, whatsapp) == (40, 24)
