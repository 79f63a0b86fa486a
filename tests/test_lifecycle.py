"""Campaign and message statuses change in one place (`app.messaging.lifecycle`), only along its tables,
each change a conditional UPDATE."""

from __future__ import annotations

import ast
import itertools
import re
from datetime import timedelta
from pathlib import Path

import pytest

from app.extensions import db
from app.messaging import lifecycle
from app.models import Campaign, CampaignStatus, ImportStatus, MessageStatus
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
    assert set(lifecycle.IMPORT_TRANSITIONS) == set(ImportStatus.ALL)
    for transitions, statuses in (
        (lifecycle.CAMPAIGN_TRANSITIONS, CampaignStatus.ALL),
        (lifecycle.MESSAGE_TRANSITIONS, MessageStatus.ALL),
        (lifecycle.IMPORT_TRANSITIONS, ImportStatus.ALL),
    ):
        assert all(targets <= set(statuses) for targets in transitions.values())
    ways_out = {s: targets for s, targets in lifecycle.MESSAGE_TRANSITIONS.items() if targets}
    # A message waits (pending), enters its campaign's window (queued), is claimed (sending) and its claim
    # ends; only a sent one takes receipts; failed and undelivered go back only to pending (retry-failed);
    # delivered is final; a canceled one leaves only for sent (a claim's late record of a send that went).
    assert ways_out[MessageStatus.PENDING] == {MessageStatus.QUEUED, MessageStatus.CANCELED, MessageStatus.SENT}
    assert ways_out[MessageStatus.QUEUED] == {
        MessageStatus.SENDING,
        MessageStatus.PENDING,
        MessageStatus.CANCELED,
        MessageStatus.SENT,
    }
    assert ways_out[MessageStatus.SENDING] == {
        MessageStatus.SENT,
        MessageStatus.FAILED,
        MessageStatus.QUEUED,
        MessageStatus.PENDING,
        MessageStatus.CANCELED,
    }
    # Receipts; and back to pending once when the provider holds it (WhatsApp 131049).
    assert ways_out[MessageStatus.SENT] == {
        MessageStatus.DELIVERED,
        MessageStatus.UNDELIVERED,
        MessageStatus.FAILED,
        MessageStatus.PENDING,
    }
    assert ways_out[MessageStatus.UNDELIVERED] == ways_out[MessageStatus.FAILED] == {MessageStatus.PENDING}
    assert ways_out[MessageStatus.CANCELED] == {MessageStatus.SENT}
    assert MessageStatus.DELIVERED not in ways_out
    assert lifecycle.CAMPAIGN_TRANSITIONS[CampaignStatus.CANCELED] == frozenset()
    assert lifecycle.IMPORT_TRANSITIONS[ImportStatus.DONE] == lifecycle.IMPORT_TRANSITIONS[ImportStatus.FAILED] == set()


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


# A status-changing UPDATE written as SQL text: the table, then its SET naming `status`.
_RAW_STATUS_UPDATE = re.compile(r"\bUPDATE\s+\w+\b.*?\bSET\b[^;]*?\bstatus\s*=", re.IGNORECASE | re.DOTALL)


def _names_status(key) -> bool:
    return (isinstance(key, ast.Constant) and key.value == "status") or (
        isinstance(key, ast.Attribute) and key.attr == "status"
    )


def status_writes(source: str, name: str) -> list[str]:
    """Places in `source` that change a row's `status` other than by inserting it, every way the code could:
    the ORM (`obj.status = ...`, `setattr(obj, "status", ...)`, `query.update({"status": ...})`), Core
    (`update(...).values(status=...)`, also through `**{"status": ...}`), and SQL text (`UPDATE ... SET
    status = ...`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        found += [
            f"{name}:{node.lineno} assigns .status"
            for t in targets
            if isinstance(t, ast.Attribute) and t.attr == "status"
        ]
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Name)
                and func.id == "setattr"
                and len(node.args) > 1
                and _names_status(node.args[1])
            ):
                found.append(f"{name}:{node.lineno} setattr status")
            if isinstance(func, ast.Attribute) and func.attr == "values" and "update(" in ast.unparse(func.value):
                spread = [k.value for k in node.keywords if k.arg is None and isinstance(k.value, ast.Dict)]
                if any(k.arg == "status" for k in node.keywords) or any(
                    _names_status(k) for d in spread for k in d.keys
                ):
                    found.append(f"{name}:{node.lineno} updates status")
            if isinstance(func, ast.Attribute) and func.attr == "update" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Dict) and any(_names_status(k) for k in first.keys):
                    found.append(f"{name}:{node.lineno} query.update status")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _RAW_STATUS_UPDATE.search(node.value):
            found.append(f"{name}:{node.lineno} SQL updates status")
    return found


def service_modules() -> list[Path]:
    """Every module of the service, by path: the `app` package and the top-level modules. (Migrations
    change the schema, and may move rows as they do; benchmarks set up data. Neither runs in the service.)"""
    return sorted([*(ROOT / "app").rglob("*.py"), *ROOT.glob("*.py")])


# Scanned when the module is collected (see tests/test_layout.py for why).
STATUS_WRITES = {
    path.relative_to(ROOT).as_posix(): status_writes(path.read_text(), path.relative_to(ROOT).as_posix())
    for path in service_modules()
}


def test_statuses_change_only_in_the_lifecycle_module():
    assert len(STATUS_WRITES) > 60, "every module is scanned, each under its own path"
    writes = [write for name, found in STATUS_WRITES.items() if name != "app/messaging/lifecycle.py" for write in found]
    assert writes == []
    assert len(STATUS_WRITES["app/messaging/lifecycle.py"]) >= 10, "the scan should see lifecycle's own writes"


@pytest.mark.parametrize(
    "source",
    [
        "message.status = 'sent'",
        "campaign.status: str = 'sent'",
        "setattr(row, 'status', 'sent')",
        "db.session.execute(update(OutboundMessage).where(x).values(status='sent'))",
        "db.session.execute(update(_M).values(**{'status': 'sent'}))",
        "session.query(Campaign).filter(x).update({'status': 'sent'})",
        "session.query(Campaign).update({Campaign.status: 'sent'})",
        "db.session.execute(text('UPDATE campaigns SET updated_at = now(), status = :s WHERE id = :id'))",
        'conn.exec_driver_sql("""update outbound_messages\n   set status=\'failed\' where id = 1""")',
    ],
)
def test_the_scan_finds_every_way_to_write_a_status(source):
    assert status_writes(source, "sample.py")


@pytest.mark.parametrize(
    "source",
    [
        "insert(OutboundMessage).values(status='pending')",
        "select(Campaign).where(Campaign.status == 'sent')",
        "text('SELECT status FROM campaigns')",
        "update(Campaign).values(updated_at=now)",
    ],
)
def test_the_scan_leaves_reads_and_inserts_alone(source):
    assert status_writes(source, "sample.py") == []
