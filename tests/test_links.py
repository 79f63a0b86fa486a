"""Short links that count clicks (app.links): codes, shortening, the redirect, what clicks show."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.links import clicks
from app.links.codes import LENGTH, MAX_LINKS, Codec, codec
from app.links.shorten import SAMPLE_CODE, Shortener, link_base
from app.messaging.segments import measure
from app.models import Customer, OutboundMessage
from tests.conftest import read_send_log, serve
from tests.factories import make_campaign, make_customer, make_customers

BASE = "https://sho.rt/l"
SHORT = re.compile(re.escape(BASE) + r"/([0-9A-Za-z]{10})")
BROWSER = "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile Safari/537.36"
# A User-Agent each link-preview fetcher or crawler sends, one per entry of PREVIEW_AGENTS.
PREVIEW_FETCHERS = [
    "WhatsApp/2.23.20.0 A",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Facebot",
    "Twitterbot/1.0",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "TelegramBot (like TwitterBot)",
    "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
    "Mozilla/5.0 (Windows NT 6.1; WOW64) SkypeUriPreview Preview/0.5",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Applebot/0.1",
]


@pytest.fixture
def links_app(app):
    app.config["LINK_BASE_URL"] = BASE
    return app


def codes_in(body: str) -> list[str]:
    return SHORT.findall(body)


def sent_messages(campaign_id: int) -> list[OutboundMessage]:
    db.session.rollback()
    return db.session.scalars(
        select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id).order_by(OutboundMessage.id)
    ).all()


def send(client, work, campaign, customers) -> list[OutboundMessage]:
    ids = [c if isinstance(c, int) else c.id for c in customers]
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    assert response.status_code == 202, response.get_json()
    work()
    return sent_messages(campaign.id)


def follow(anonymous_client, code: str, method: str = "GET", agent: str = BROWSER):
    return anonymous_client.open(f"/l/{code}", method=method, headers={"User-Agent": agent})


# --- codes and shortening (no database) ---------------------------------------------------------------------


def test_codes_are_ten_characters_each_its_own_and_decode_back():
    codec_ = Codec(b"k" * 32)
    seen = set()
    for message_id in (1, 2, 3, 999_999, 10**12, 2**54 - 1):
        for position in range(MAX_LINKS):
            code = codec_.encode(message_id, position)
            assert re.fullmatch(r"[0-9A-Za-z]{10}", code)
            assert codec_.decode(code) == (message_id, position)
            seen.add(code)
    assert len(seen) == 6 * MAX_LINKS
    # No sequence: the codes of consecutive messages share no prefix beyond chance, and sort in no order.
    codes = [codec_.encode(message_id, 0) for message_id in range(1, 201)]
    assert codes != sorted(codes)
    assert max(sum(a[i] == b[i] for i in range(LENGTH)) for a, b in zip(codes, codes[1:], strict=False)) <= 4
    # Another key, other codes.
    assert Codec(b"j" * 32).encode(1, 0) != codec_.encode(1, 0)


def test_codes_stay_the_same_from_one_version_to_the_next():
    # Links already sent must keep working: the cipher's output under a given key is fixed, not an
    # implementation detail. These were issued by the first version.
    codec_ = Codec(b"k" * 32)
    assert (codec_.encode(1, 0), codec_.encode(987654321, 3)) == ("6yQHT82NrK", "9nPi47Zvob")
    assert codec_.decode("9nPi47Zvob") == (987654321, 3)


@pytest.mark.parametrize("code", ["", "abc", "abcdefghijk", "abcdefghi!", "zzzzzzzzzz", "../../etc/x", "ÄÄÄÄÄÄÄÄÄÄ"])
def test_what_is_not_a_code_decodes_to_nothing(code):
    # `zzzzzzzzzz` is of the form but larger than any code.
    assert Codec(b"k" * 32).decode(code) is None


def shortener() -> Shortener:
    return Shortener(BASE, lambda position: f"code{position:06d}")


def test_a_url_keeps_its_query_and_fragment_and_the_sentence_keeps_its_punctuation():
    s = shortener()
    body = s.shorten("Sale! https://shop.example/p?id=7&utm=sms#top. And (see http://b.example/x_(y)), ok?")
    assert body == f"Sale! {BASE}/code000000. And (see {BASE}/code000001), ok?"
    assert s.links == ["https://shop.example/p?id=7&utm=sms#top", "http://b.example/x_(y)"]


def test_two_links_get_two_codes_and_the_same_link_twice_one():
    s = shortener()
    body = s.shorten("a https://a.example/1 b https://b.example/2 c https://a.example/1")
    assert body == f"a {BASE}/code000000 b {BASE}/code000001 c {BASE}/code000000"
    assert s.links == ["https://a.example/1", "https://b.example/2"]
    short = shortener()
    assert (short.shorten("go http://x!"), short.links) == (f"go {BASE}/code000000!", ["http://x"])


def test_text_without_links_and_links_already_short_are_left_as_they_are():
    s = shortener()
    text = f"Hi, no link here; mail x@y.example; ftp://files.example/a; {BASE}/abcdefghij; http://"
    assert s.shorten(text) == text
    assert s.links == []


def test_links_past_the_sixteenth_stay_long():
    s = shortener()
    body = s.shorten(" ".join(f"https://x.example/{n}" for n in range(MAX_LINKS + 2)))
    assert body.endswith(f"{BASE}/code000015 https://x.example/16 https://x.example/17")
    assert len(s.links) == MAX_LINKS


def test_the_link_base_defaults_to_the_public_url_then_to_this_machine():
    assert link_base({"LINK_BASE_URL": "https://go.example", "PUBLIC_BASE_URL": "https://api.example"}) == (
        "https://go.example"
    )
    assert link_base({"LINK_BASE_URL": "", "PUBLIC_BASE_URL": "https://api.example"}) == "https://api.example/l"
    assert link_base({"LINK_BASE_URL": "", "PUBLIC_BASE_URL": "", "PORT": 5000}) == "http://127.0.0.1:5000/l"


@pytest.mark.parametrize("agent", PREVIEW_FETCHERS)
def test_each_preview_fetcher_is_told_apart_from_a_person(agent):
    assert clicks.is_preview(agent)


def test_browsers_are_people():
    for agent in (BROWSER, "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1", "", None):
        assert not clicks.is_preview(agent)


def test_every_listed_fetcher_is_tested():
    assert all(any(name in agent.lower() for agent in PREVIEW_FETCHERS) for name in clicks.PREVIEW_AGENTS)


# --- through the API and the worker ---------------------------------------------------------------------------

TEMPLATE = "Hi {first_name}, 20% off: https://shop.example/sale?id=7&utm=sms#top and http://b.example/x."


def test_a_sent_message_carries_short_links_of_its_own_that_redirect_and_count(
    links_app, client, anonymous_client, work
):
    campaign = make_campaign(base_template=TEMPLATE)
    first, second = send(client, work, campaign, make_customers(2))
    assert first.status == "sent" and first.links == [
        "https://shop.example/sale?id=7&utm=sms#top",
        "http://b.example/x",
    ]
    codes = codes_in(first.rendered_content)
    assert len(codes) == 2 and set(codes).isdisjoint(codes_in(second.rendered_content))
    assert (
        first.rendered_content == f"Hi {first_customer_name(first)}, 20% off: {BASE}/{codes[0]} and {BASE}/{codes[1]}."
    )

    response = follow(anonymous_client, codes[0])
    assert response.status_code == 302
    assert response.headers["Location"] == "https://shop.example/sale?id=7&utm=sms#top"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.data == b""
    assert follow(anonymous_client, codes[0]).status_code == 302
    assert follow(anonymous_client, codes[1]).headers["Location"] == "http://b.example/x"

    db.session.rollback()  # the test's session holds the messages as they were
    listing = client.get(f"/campaigns/{campaign.id}/messages").get_json()["data"]
    shown = {m["id"]: m for m in listing}
    assert shown[first.id]["clicks"] == 3 and shown[first.id]["first_clicked_at"] is not None
    assert shown[first.id]["status"] == "sent"  # a click changes no status
    assert shown[second.id]["clicks"] == 0 and shown[second.id]["first_clicked_at"] is None
    stats = client.get(f"/campaigns/{campaign.id}").get_json()["stats"]
    assert (stats["clicked"], stats["clicks"], stats["sent"]) == (1, 3, 2)

    links = client.get(f"/campaigns/{campaign.id}/links").get_json()
    assert links["over"] == "sent"  # the mock sends no delivery receipts
    assert links["links"] == [
        {
            "url": "https://shop.example/sale?id=7&utm=sms#top",
            "messages": 2,
            "clicks": 2,
            "clicked": 1,
            "reached": 2,
            "click_rate": 0.5,
        },
        {"url": "http://b.example/x", "messages": 2, "clicks": 1, "clicked": 1, "reached": 2, "click_rate": 0.5},
    ]


def first_customer_name(message: OutboundMessage) -> str:
    return db.session.get(Customer, message.customer_id).first_name


def test_head_and_preview_fetchers_are_redirected_without_counting(links_app, client, anonymous_client, work):
    campaign = make_campaign(base_template=TEMPLATE)
    (message,) = send(client, work, campaign, [make_customer()])
    code = codes_in(message.rendered_content)[0]
    head = follow(anonymous_client, code, method="HEAD")
    assert (head.status_code, head.headers["Location"]) == (302, message.links[0])
    for agent in PREVIEW_FETCHERS:
        response = follow(anonymous_client, code, agent=agent)
        assert (response.status_code, response.headers["Location"]) == (302, message.links[0])
    stats = client.get(f"/campaigns/{campaign.id}").get_json()["stats"]
    assert (stats["clicked"], stats["clicks"]) == (0, 0)
    metrics = client.get("/metrics").data.decode()
    assert 'dispatch_link_requests_total{result="head"} 1.0' in metrics
    assert f'dispatch_link_requests_total{{result="preview"}} {len(PREVIEW_FETCHERS)}.0' in metrics


def test_unknown_malformed_and_tampered_codes_are_a_plain_404_that_counts_nothing(
    links_app, client, anonymous_client, work
):
    campaign = make_campaign(base_template=TEMPLATE)
    (message,) = send(client, work, campaign, [make_customer()])
    code = codes_in(message.rendered_content)[0]
    tampered = [code[:-1] + ("A" if code[-1] != "A" else "B"), code[1:] + code[0], code.swapcase()]
    # A real message's position past its links, and a message that does not exist, under real codes.
    forged = [codec(links_app).encode(message.id, 5), codec(links_app).encode(message.id + 1000, 0)]
    for bad in [*tampered, *forged, "0000000000", "short", "x" * 11, "abc!defghi", SAMPLE_CODE]:
        response = follow(anonymous_client, bad)
        assert response.status_code == 404, bad
        assert response.mimetype == "text/plain"
        assert response.data == b"This link does not exist.\n"
        assert "Location" not in response.headers
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["clicks"] == 0
    assert 'dispatch_link_requests_total{result="unknown"} 10.0' in client.get("/metrics").data.decode()


def test_the_redirect_needs_no_key_and_no_rate_limit_counts_it(links_app, client, anonymous_client, work):
    campaign = make_campaign(base_template=TEMPLATE)
    (message,) = send(client, work, campaign, [make_customer()])
    code = codes_in(message.rendered_content)[0]
    links_app.config["API_RATE_LIMIT"] = "2 per minute"
    for _ in range(6):
        assert follow(anonymous_client, code).status_code == 302
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["clicks"] == 6


def test_without_track_links_the_body_goes_exactly_as_rendered(links_app, client, work):
    created = client.post(
        "/campaigns",
        json={"name": "Plain", "channel": "sms", "base_template": "See https://shop.example/a", "track_links": False},
    ).get_json()
    assert created["track_links"] is False
    assert (
        client.post("/campaigns", json={"name": "New", "channel": "sms", "base_template": "x"}).get_json()[
            "track_links"
        ]
        is True
    )
    customer = make_customer()
    assert client.post(f"/campaigns/{created['id']}/send", json={"customer_ids": [customer.id]}).status_code == 202
    work()
    (message,) = sent_messages(created["id"])
    assert (message.rendered_content, message.links) == ("See https://shop.example/a", None)


LONG_URL = "https://shop.example/collections/summer-sale/items?utm_source=sms&utm_campaign=summer_2026&ref=" + "a" * 60


def test_shortening_drops_a_segment_in_the_preview_the_estimate_and_what_is_stored(links_app, client, work):
    template = "Hi {first_name}! Our summer sale is on: every item at half price this week only. " + LONG_URL
    assert measure(template.replace("{first_name}", "Amina"))[2] == 2  # long: two segments
    campaign = make_campaign(base_template=template)
    customer = make_customer(first_name="Amina")
    preview = client.post(
        f"/campaigns/{campaign.id}/personalized-preview", json={"customer_id": customer.id}
    ).get_json()
    assert preview["rendered_message"].endswith(f"{BASE}/{SAMPLE_CODE}")
    assert (preview["segments"], preview["links"]) == (1, [LONG_URL])
    estimate = client.post(f"/campaigns/{campaign.id}/estimate", json={"customer_ids": [customer.id]}).get_json()
    assert (estimate["recipients"], estimate["segments"]) == (1, 1)
    (message,) = send(client, work, campaign, [customer])
    assert message.segments == 1 and len(message.rendered_content) == len(preview["rendered_message"])
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["segments_sent"] == 1


def test_a_whatsapp_templates_parameters_that_hold_urls_are_shortened(links_app, client, work, send_log):
    campaign = make_campaign(
        channel="whatsapp",
        base_template="Hi {first_name}, your order: {attributes.order_url}",
        whatsapp_template={"name": "order_ready", "language": "en_US"},
    )
    customer = make_customer(first_name="Amina", attributes={"order_url": "https://shop.example/o/81?t=x"})
    (message,) = send(client, work, campaign, [customer])
    (attempt,) = read_send_log(send_log)
    name, link = attempt["template"]["parameters"]
    (code,) = codes_in(link)
    assert (name, link) == ("Amina", f"{BASE}/{code}")
    assert message.rendered_content == f"Hi Amina, your order: {BASE}/{code}"
    assert message.links == ["https://shop.example/o/81?t=x"]


def test_a_retried_message_keeps_its_codes(links_app, client, work, send_log):
    links_app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 1
    campaign = make_campaign(base_template=TEMPLATE)
    (message,) = send(client, work, campaign, [make_customer()])
    first, second = read_send_log(send_log)
    assert (first["ok"], second["ok"]) == (False, True)
    assert codes_in(first["body"]) == codes_in(second["body"]) == codes_in(message.rendered_content)


def test_customers_who_clicked_are_an_audience(links_app, client, anonymous_client, work):
    campaign = make_campaign(base_template=TEMPLATE)
    clicker, other = make_customers(2)
    messages = send(client, work, campaign, [clicker, other])
    clicked = next(m for m in messages if m.customer_id == clicker)
    assert follow(anonymous_client, codes_in(clicked.rendered_content)[1]).status_code == 302
    spec = {"filter": {"campaign": campaign.id, "event": "clicked"}}
    assert client.post("/audiences/count", json=spec).get_json()["customers"] == 1
    negated = {"filter": {"not": {"campaign": campaign.id, "event": "clicked"}}}
    everyone = db.session.scalar(select(func.count()).select_from(Customer))
    assert client.post("/audiences/count", json=negated).get_json()["customers"] == everyone - 1


def test_track_links_is_changed_with_a_patch_and_the_next_messages_follow_it(links_app, client, work):
    campaign = make_campaign(base_template=TEMPLATE)
    answer = client.patch(f"/campaigns/{campaign.id}", json={"track_links": False})
    assert (answer.status_code, answer.get_json()["track_links"]) == (200, False)
    (message,) = send(client, work, campaign, [make_customer(first_name="Amina")])
    assert (
        message.rendered_content
        == "Hi Amina, 20% off: https://shop.example/sale?id=7&utm=sms#top and http://b.example/x."
    )
    assert message.links is None


def test_other_methods_are_refused_and_nothing_is_counted(links_app, client, anonymous_client, work):
    campaign = make_campaign(base_template=TEMPLATE)
    (message,) = send(client, work, campaign, [make_customer()])
    code = codes_in(message.rendered_content)[0]
    for method in ("POST", "PUT", "DELETE"):
        response = follow(anonymous_client, code, method=method)
        assert (response.status_code, response.headers["Allow"]) == (405, "GET, HEAD")
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["clicks"] == 0


@pytest.mark.real_only
def test_a_stopped_database_answers_503_and_clicks_go_on_once_it_is_back_even_on_a_dead_pooled_connection(
    private_app, pg_server
):
    with private_app.app_context():
        campaign = make_campaign(base_template=TEMPLATE)
        (customer,) = make_customers(1)
        message = OutboundMessage(
            campaign_id=campaign.id, customer_id=customer, status="sent", links=["https://shop.example/a"]
        )
        db.session.add(message)
        db.session.commit()
        code = codec(private_app).encode(message.id, 0)
    with serve(private_app) as base:

        def get(path: str):
            request = urllib.request.Request(f"{base}{path}", headers={"User-Agent": BROWSER})
            opener = urllib.request.build_opener(NoRedirect)
            try:
                answer = opener.open(request, timeout=30)
            except urllib.error.HTTPError as refused:
                answer = refused
            return answer.status, answer.headers, answer.read()

        assert get(f"/l/{code}")[0] == 302
        pg_server.stop()
        try:
            for _ in range(2):  # on the pooled connection, then on a new one
                status, headers, body = get(f"/l/{code}")
                assert (status, headers["Retry-After"], headers["Content-Type"]) == (
                    503,
                    "5",
                    "text/plain; charset=utf-8",
                )
                assert body.startswith(b"This link cannot be followed right now")
        finally:
            pg_server.start()
        status, headers, _ = get(f"/l/{code}")
        assert (status, headers["Location"]) == (302, "https://shop.example/a")
        # A restart between two clicks: the pooled connection (not pinged before a click) is dead, and the
        # click goes through on a new one, counted once.
        pg_server.stop()
        pg_server.start()
        status, headers, _ = get(f"/l/{code}")
        assert (status, headers["Location"]) == (302, "https://shop.example/a")
    with private_app.app_context():
        assert db.session.get(OutboundMessage, message.id).clicks == 3


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
