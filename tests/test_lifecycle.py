"""Campaign and message statuses change in one place (`app.messaging.lifecycle`), only along its tables,
each change a conditional UPDATE."""

from __future__ import annotations

import ast
import itertools
from datetime import timedelta
from pathlib import Path

import pytest

from app.extensions import db
from app.messaging import lifecycle
from app.models import Campaign, CampaignStatus, MessageStatus
from tests.factories import make_campaign

ROOT = Path(__file__).resolve().parent.parent


def status_of(campaign_id: int) -> str:
    db.session.expire_all()
    return db.session.get(Campaign, campaign_id).status


@pytest.mark.parametrize(("source", "target"), list(itertools.product(CampaignStatus.ALL, repeat=2)))
def test_a_campaign_moves_only_along_the_table(app, source, target):
    campaign = make_campaign(status=source)
    moved = lifecycle.move_campaign(campaign.id, target)
    db.session.commit()
    assert moved == (target in lifecycle.CAMPAIGN_TRANSITIONS[source])
    assert status_of(campaign.id) == (target if moved else source)


def test_the_tables_name_every_status():
    assert set(lifecycle.CAMPAIGN_TRANSITIONS) == set(CampaignStatus.ALL)
    assert set(lifecycle.MESSAGE_TRANSITIONS) == set(MessageStatus.ALL)
    for transitions, statuses in (
        (lifecycle.CAMPAIGN_TRANSITIONS, CampaignStatus.ALL),
        (lifecycle.MESSAGE_TRANSITIONS, MessageStatus.ALL),
    ):
        assert all(targets <= set(statuses) for targets in transitions.values())
    # An attempt's outcome leaves only `pending` (or a canceled message the provider took), a receipt's
    # only `sent`; failed and undelivered go back only to pending (retry-failed); delivered is final, and
    # canceled and sent campaigns stay so but for retry-failed.
    ways_out = {s: targets for s, targets in lifecycle.MESSAGE_TRANSITIONS.items() if targets}
    assert list(ways_out) == [
        MessageStatus.PENDING,
        MessageStatus.SENT,
        MessageStatus.UNDELIVERED,
        MessageStatus.FAILED,
        MessageStatus.CANCELED,
    ]
    assert ways_out[MessageStatus.PENDING] == {
        MessageStatus.PENDING,
        MessageStatus.SENT,
        MessageStatus.FAILED,
        MessageStatus.CANCELED,
    }
    assert ways_out[MessageStatus.UNDELIVERED] == ways_out[MessageStatus.FAILED] == {MessageStatus.PENDING}
    assert ways_out[MessageStatus.CANCELED] == {MessageStatus.SENT}
    assert lifecycle.CAMPAIGN_TRANSITIONS[CampaignStatus.CANCELED] == frozenset()


def test_a_due_trigger_moves_a_scheduled_campaign_once_and_never_early(app, clock):
    campaign = make_campaign(status=CampaignStatus.SCHEDULED, scheduled_at=clock.now() + timedelta(minutes=5))
    assert not lifecycle.start_due_campaign(campaign.id)
    clock.advance(minutes=5)
    assert lifecycle.start_due_campaign(campaign.id)
    assert not lifecycle.start_due_campaign(campaign.id)
    assert status_of(campaign.id) == CampaignStatus.SENDING


def test_a_draft_is_never_started_by_a_trigger(app, clock):
    campaign = make_campaign(status=CampaignStatus.DRAFT, scheduled_at=clock.now() - timedelta(minutes=5))
    assert not lifecycle.start_due_campaign(campaign.id)
    assert status_of(campaign.id) == CampaignStatus.DRAFT


def _status_writes(path: Path) -> list[str]:
    """Places in `path` that write a campaign's or a message's status other than by inserting a row:
    `update(Campaign)` / `update(OutboundMessage)` setting `status`, and assignments to `.status`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "status":
                    found.append(f"{path.name}:{node.lineno} assigns .status")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
            chain = ast.unparse(node.func.value)
            if ("update(Campaign)" in chain or "update(OutboundMessage)" in chain) and any(
                keyword.arg == "status" for keyword in node.keywords
            ):
                found.append(f"{path.name}:{node.lineno} updates status")
    return found


# Scanned when the module is collected (see tests/test_layout.py for why).
STATUS_WRITES = {path.name: _status_writes(path) for path in (ROOT / "app").rglob("*.py")}


def test_statuses_change_only_in_the_lifecycle_module():
    writes = [write for name, found in STATUS_WRITES.items() if name != "lifecycle.py" for write in found]
    assert writes == []
    assert STATUS_WRITES["lifecycle.py"], "the scan should see lifecycle's own writes"
