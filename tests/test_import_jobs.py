"""Imports over IMPORT_SYNC_MAX_BYTES run as a job: 202, an import resource, progress committed with
each batch, resumed after a crash with exact counts, re-queued by the reconciler when Redis loses it."""

import io

import pytest
from rq import Queue
from rq.job import Job

from app.customers import import_jobs
from app.customers.csv_import import ImportReport
from app.extensions import db
from app.messaging.reconcile import reconcile
from app.models import Customer, CustomerImport, CustomerImportChunk
from tests.conftest import kill_group, wait_for
from tests.factories import make_customer

HEADER = "phone,first_name,location\n"


def make_file(rows: int) -> tuple[bytes, dict]:
    """A CSV of `rows` records: every 500th repeats the phone before it (an update), every 1000th has a
    bad phone (invalid); returns it with the report an import of it gives."""
    lines, phones, updated, errors = [], set(), 0, []
    for i in range(rows):
        if i % 1000 == 999:
            lines.append(f"not-a-phone,Bad{i},Nairobi\n")
            errors.append(i + 2)  # the header is line 1
        elif i % 500 == 250:
            lines.append(f"+2547{i - 1:08d},Again{i},\n")
            updated += 1
        else:
            lines.append(f"+2547{i:08d},First{i},Nairobi\n")
            phones.add(i)
    expected = {"created": len(phones), "updated": updated, "invalid": len(errors), "errors_truncated": False}
    return (HEADER + "".join(lines)).encode(), {**expected, "error_lines": errors}


def post(client, body: bytes):
    return client.post("/customers/import", data=body, content_type="text/csv")


def imported(client, location: str) -> dict:
    response = client.get(location)
    assert response.status_code == 200
    return response.get_json()


def assert_report(report: dict, expected: dict) -> None:
    assert {k: report[k] for k in ("created", "updated", "invalid", "errors_truncated")} == {
        k: expected[k] for k in ("created", "updated", "invalid", "errors_truncated")
    }
    assert [e["line"] for e in report["errors"]] == expected["error_lines"]
    assert all(e["reason"].startswith("phone:") for e in report["errors"])


def customer_count() -> int:
    db.session.rollback()
    return db.session.scalar(db.select(db.func.count()).select_from(Customer))


def chunk_count() -> int:
    return db.session.scalar(db.select(db.func.count()).select_from(CustomerImportChunk))


@pytest.fixture
def big(app):
    """Imports of more than 1,000 bytes run as a job, in batches of 50 records."""
    app.config["IMPORT_SYNC_MAX_BYTES"] = 1000
    app.config["IMPORT_BATCH_SIZE"] = 50


def test_a_big_import_is_202_with_a_location_and_a_job_imports_it(app, client, big, work, redis_conn):
    body, expected = make_file(2100)
    response = post(client, body)
    assert response.status_code == 202
    location = response.headers["Location"]
    assert location == f"/customers/imports/{response.get_json()['id']}"
    queued = response.get_json()
    assert (queued["status"], queued["bytes_total"], queued["bytes_done"]) == ("queued", len(body), 0)
    assert queued["report"] == {"created": 0, "updated": 0, "invalid": 0, "errors": [], "errors_truncated": False}
    assert imported(client, location)["status"] == "queued"
    assert customer_count() == 0
    job = Job.fetch(import_jobs.import_job_id(queued["id"]), connection=redis_conn)
    assert job.origin == app.config["CONTROL_QUEUE"]
    assert job.timeout == import_jobs.IMPORT_JOB_TIMEOUT  # not RQ's default of 180 s

    work()
    done = imported(client, location)
    assert done["status"] == "done" and done["status_reason"] is None
    assert (done["bytes_done"], done["lines_done"]) == (len(body), 2101)
    assert done["finished_at"] is not None
    assert_report(done["report"], expected)
    assert customer_count() == expected["created"]
    assert chunk_count() == 0  # the upload is deleted when the import ends


def test_a_big_multipart_upload_runs_as_a_job_too(client, big, work):
    body, expected = make_file(300)
    response = client.post(
        "/customers/import", data={"file": (io.BytesIO(body), "c.csv")}, content_type="multipart/form-data"
    )
    assert response.status_code == 202
    work()
    assert_report(imported(client, response.headers["Location"])["report"], expected)


def test_an_import_at_most_the_sync_limit_answers_at_once(client, app):
    body, expected = make_file(300)
    app.config["IMPORT_SYNC_MAX_BYTES"] = len(body)
    response = post(client, body)
    assert response.status_code == 200
    assert_report(response.get_json(), expected)


def test_the_upload_is_read_back_across_its_chunks(client, big, work, monkeypatch):
    monkeypatch.setattr(import_jobs, "CHUNK_BYTES", 97)  # records cut across chunks everywhere
    body, expected = make_file(1200)
    response = post(client, body)
    import_id = response.get_json()["id"]
    assert chunk_count() == -(-len(body) // 97)
    work()
    assert_report(imported(client, f"/customers/imports/{import_id}")["report"], expected)
    assert customer_count() == expected["created"]


def test_columns_and_empty_cells_follow_the_same_rules_as_a_small_import(client, big, work):
    make_customer(phone="+254700000001", first_name="Amina", last_name="Otieno", location="Kisumu")
    body = (HEADER + "+254700000001,,Nairobi\n" + "".join(f"+2547{n:08d},N{n},\n" for n in range(2, 100))).encode()
    post(client, body)
    work()
    customer = db.session.scalar(db.select(Customer).where(Customer.phone == "+254700000001"))
    assert (customer.first_name, customer.last_name, customer.location) == ("Amina", "Otieno", "Nairobi")


def test_a_bad_header_is_422_and_stores_nothing(client, big):
    response = post(client, b"phone,nick name\n" + b"0712000001,x\n" * 200)
    assert response.status_code == 422
    assert "nick name" in response.get_json()["message"]
    assert db.session.scalar(db.select(db.func.count()).select_from(CustomerImport)) == 0
    assert chunk_count() == 0


def test_an_unknown_import_is_404(client):
    response = client.get("/customers/imports/999")
    assert response.status_code == 404
    assert response.get_json()["message"] == "import 999 not found"


def fail_after(monkeypatch, batches: int) -> None:
    """Make the import job fail at its `batches`+1-th batch, as a crash would."""
    calls = {"n": 0}
    real = import_jobs.write_batch

    def flaky(batch, columns, report: ImportReport):
        calls["n"] += 1
        if calls["n"] > batches:
            raise RuntimeError("the worker died here")
        real(batch, columns, report)

    monkeypatch.setattr(import_jobs, "write_batch", flaky)


def test_an_interrupted_import_resumes_where_its_last_batch_ended(client, big, work, monkeypatch):
    body, expected = make_file(2100)
    location = post(client, body).headers["Location"]
    import_id = int(location.rsplit("/", 1)[1])
    with monkeypatch.context() as patch:
        fail_after(patch, 20)
        with pytest.raises(RuntimeError):
            import_jobs.run_import(import_id)  # a run that dies at its 21st batch
        db.session.rollback()
    stopped = imported(client, location)
    assert stopped["status"] == "running"
    assert stopped["lines_done"] == 1 + 20 * 50  # the header and 20 batches of 50 records
    assert 0 < stopped["bytes_done"] < len(body)
    # What is committed is what is counted: the counts were committed with the rows.
    assert customer_count() == stopped["report"]["created"] > 0

    work()  # the job queued by the upload runs, and resumes
    done = imported(client, location)
    assert done["status"] == "done"
    assert_report(done["report"], expected)
    assert customer_count() == expected["created"]


def test_an_import_that_keeps_failing_is_given_up(app, client, big, monkeypatch):
    location = post(client, make_file(300)[0]).headers["Location"]
    import_id = int(location.rsplit("/", 1)[1])
    fail_after(monkeypatch, 0)
    for _ in range(import_jobs.MAX_ATTEMPTS):
        with pytest.raises(RuntimeError):
            import_jobs.run_import(import_id)
        db.session.rollback()
    assert imported(client, location)["status"] == "running"
    assert import_jobs.run_import(import_id) == "failed"
    failed = imported(client, location)
    assert failed["status"] == "failed"
    assert "gave up" in failed["status_reason"]
    assert chunk_count() == 0
    assert import_jobs.run_import(import_id).startswith("nothing to do")


def test_the_reconciler_requeues_an_import_whose_job_redis_lost(app, client, big, work, clock, redis_conn):
    body, expected = make_file(600)
    location = post(client, body).headers["Location"]
    redis_conn.flushdb()
    work()
    assert imported(client, location)["status"] == "queued"  # nothing left to run it
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued_imports == 1
    assert reconcile().requeued_imports == 0  # its job is waiting now
    work()
    assert_report(imported(client, location)["report"], expected)


def test_the_reconciler_leaves_an_import_whose_job_is_waiting(app, client, big, clock, redis_conn):
    post(client, make_file(300)[0])
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued_imports == 0
    assert Queue(app.config["CONTROL_QUEUE"], connection=redis_conn).count == 1


def test_a_job_run_again_after_the_end_does_nothing(client, big, work):
    body, expected = make_file(300)
    location = post(client, body).headers["Location"]
    work()
    import_id = int(location.rsplit("/", 1)[1])
    assert import_jobs.run_import(import_id).startswith("nothing to do")
    assert_report(imported(client, location)["report"], expected)


@pytest.mark.real_only
def test_a_worker_killed_mid_import_is_resumed_by_another_with_the_same_report(app, client, big, clock, spawn_worker):
    body, expected = make_file(30_000)
    location = post(client, body).headers["Location"]
    import_id = int(location.rsplit("/", 1)[1])

    def progress() -> CustomerImport:
        db.session.rollback()
        return db.session.get(CustomerImport, import_id)

    worker = spawn_worker(burst=False, IMPORT_BATCH_SIZE=50)
    wait_for(lambda: progress().bytes_done > len(body) // 10, timeout=60, interval=0.02)
    kill_group(worker)
    stopped = progress()
    assert stopped.status == "running" and stopped.bytes_done < len(body), "the import ended before the kill"
    assert customer_count() == stopped.created_count > 0

    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued_imports == 1
    spawn_worker(IMPORT_BATCH_SIZE=50).wait(timeout=120)
    done = imported(client, location)
    assert done["status"] == "done", done
    assert_report(done["report"], expected)
    assert customer_count() == expected["created"]
    assert chunk_count() == 0
