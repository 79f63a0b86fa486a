"""Bulk import of customers: the API (text/csv or multipart) and `flask customers import`."""

import io
import json
import threading

import pytest
from sqlalchemy import text

from app.extensions import db
from app.models import Customer
from tests.conftest import TEST_API_KEY
from tests.factories import make_customer
from tests.helpers import raw_request

GOOD = (
    "phone,first_name,last_name,location,preferred_product\n"
    "0712000001,Amina,Otieno,Nairobi,Sneakers\n"
    '+254712000002,"Kamau, Brian",,Mombasa,\n'
)


def customers_by_phone():
    return {c.phone: c for c in db.session.scalars(db.select(Customer))}


def test_csv_body_creates_customers(client):
    response = client.post("/customers/import", data=GOOD, content_type="text/csv")
    assert response.status_code == 200
    assert response.get_json() == {"created": 2, "updated": 0, "invalid": 0, "errors": [], "errors_truncated": False}
    stored = customers_by_phone()
    assert stored["+254712000001"].first_name == "Amina"
    assert stored["+254712000002"].first_name == "Kamau, Brian"
    assert stored["+254712000002"].last_name is None  # an empty field is null, and renders [unknown]


def test_import_upserts_by_phone(client):
    make_customer(phone="+254712000001", first_name="Old", location="Kisumu")
    report = client.post("/customers/import", data=GOOD, content_type="text/csv").get_json()
    assert (report["created"], report["updated"]) == (1, 1)
    customer = customers_by_phone()["+254712000001"]
    assert (customer.first_name, customer.location) == ("Amina", "Nairobi")


def test_bad_rows_are_reported_by_line_and_good_rows_kept(client):
    body = (
        "phone,first_name,location\n"
        "0712000001,Amina,Nairobi\n"
        "not-a-phone,Bad,Nairobi\n"
        ",NoPhone,Nairobi\n"
        "0712000003,Too,Many,Fields\n"
        f"0712000004,{'x' * 101},Nairobi\n"
        "\n"
        "0712000005,Esther,Kisumu\n"
    )
    report = client.post("/customers/import", data=body, content_type="text/csv").get_json()
    assert (report["created"], report["updated"], report["invalid"]) == (2, 0, 4)
    assert [e["line"] for e in report["errors"]] == [3, 4, 5, 6]
    reasons = [e["reason"] for e in report["errors"]]
    assert reasons[0].startswith("phone:")
    assert reasons[1] == "phone: missing"
    assert reasons[2] == "expected 3 fields, found 4"
    assert "first_name: longer than 100" in reasons[3]
    assert set(customers_by_phone()) == {"+254712000001", "+254712000005"}


def test_same_phone_twice_in_a_file_keeps_the_later_line(client):
    body = "phone,first_name\n0712000001,First\n0712 000 001,Second\n"
    report = client.post("/customers/import", data=body, content_type="text/csv").get_json()
    assert (report["created"], report["updated"]) == (1, 1)
    assert customers_by_phone()["+254712000001"].first_name == "Second"


def test_multipart_file_upload(client):
    data = {"file": (io.BytesIO(GOOD.encode()), "customers.csv")}
    response = client.post("/customers/import", data=data, content_type="multipart/form-data")
    assert response.status_code == 200
    assert response.get_json()["created"] == 2


def test_rows_span_several_batches(client, app):
    app.config["IMPORT_BATCH_SIZE"] = 7
    lines = "".join(f"07120{n:05d},N{n}\n" for n in range(1, 51))
    report = client.post("/customers/import", data="phone,first_name\n" + lines, content_type="text/csv").get_json()
    assert report["created"] == 50
    assert len(customers_by_phone()) == 50


def test_bad_header_is_422_and_imports_nothing(client):
    for body, named in [
        ("", "empty"),
        ("first_name,location\nA,B\n", "no phone column"),
        ("phone,frist name\n0712000001,A\n", "frist name"),
        ("phone,spend:money\n0712000001,3\n", "spend:money"),
    ]:
        response = client.post("/customers/import", data=body, content_type="text/csv")
        assert response.status_code == 422
        assert named in response.get_json()["message"]
    assert customers_by_phone() == {}


def test_not_csv_is_422(client):
    response = client.post("/customers/import", json={"phone": "0712000001"})
    assert response.status_code == 422
    response = client.post("/customers/import", data={"other": "x"}, content_type="multipart/form-data")
    assert response.status_code == 422
    assert "file" in response.get_json()["message"]


def test_invalid_utf8_row_is_rejected(client):
    body = b"phone,first_name\n0712000001,Am\xffina\n0712000002,Brian\n"
    report = client.post("/customers/import", data=body, content_type="text/csv").get_json()
    assert (report["created"], report["invalid"]) == (1, 1)
    assert "UTF-8" in report["errors"][0]["reason"]


def test_control_and_bidi_override_characters_make_a_row_invalid(client):
    body = (
        "phone,first_name,last_name\n0712000001,Amina\x1b[31m,X\n0712000002,Brian,Ot\u202eieno\n0712000003,Cy,\u200fZ\n"
    )
    report = client.post("/customers/import", data=body.encode(), content_type="text/csv").get_json()
    assert (report["created"], report["invalid"]) == (1, 2)
    assert [e["line"] for e in report["errors"]] == [2, 3]
    assert "first_name: Must not contain control characters" in report["errors"][0]["reason"]
    assert "last_name: Must not contain bidirectional override" in report["errors"][1]["reason"]


def test_cli_import_reports_counts_and_lines(runner, tmp_path):
    path = tmp_path / "customers.csv"
    path.write_text(GOOD + "bad-phone,Row,,,\n")
    result = runner.invoke(args=["customers", "import", str(path)])
    assert result.exit_code == 0, result.output
    assert "created 2, updated 0, invalid 1" in result.output
    assert "line 4: phone:" in result.output
    assert len(customers_by_phone()) == 2


def test_cli_import_bad_header_fails(runner, tmp_path):
    path = tmp_path / "customers.csv"
    path.write_text("name\nx\n")
    result = runner.invoke(args=["customers", "import", str(path)])
    assert result.exit_code != 0
    assert "no phone column" in result.output


def import_csv(client, body):
    response = client.post("/customers/import", data=body, content_type="text/csv")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_columns_missing_from_the_header_are_left_as_they_are(client):
    make_customer(phone="+254712000001", first_name="Amina", last_name="Otieno", preferred_product="Sneakers")
    report = import_csv(client, "phone,location\n0712000001,Kisumu\n0712000002,Mombasa\n")
    assert (report["created"], report["updated"]) == (1, 1)
    stored = customers_by_phone()
    kept = stored["+254712000001"]
    assert (kept.first_name, kept.last_name, kept.preferred_product, kept.location) == (
        "Amina",
        "Otieno",
        "Sneakers",
        "Kisumu",
    )
    new = stored["+254712000002"]
    assert (new.first_name, new.last_name, new.preferred_product, new.location) == (None, None, None, "Mombasa")


def test_an_empty_cell_keeps_the_stored_value(client):
    make_customer(phone="+254712000001", first_name="Amina", last_name="Otieno", location="Nairobi")
    import_csv(client, "phone,first_name,last_name,location\n0712000001,,Wanjiru,  \n")
    customer = customers_by_phone()["+254712000001"]
    assert (customer.first_name, customer.last_name, customer.location) == ("Amina", "Wanjiru", "Nairobi")


def test_lines_for_the_same_phone_merge_later_non_empty_values_win(client, app):
    body = "phone,first_name,last_name,location\n0712000001,Amina,Otieno,\n0712000001,,Wanjiru,Kisumu\n"
    for batch_size in (1000, 1):  # in one batch, and across batches
        app.config["IMPORT_BATCH_SIZE"] = batch_size
        db.session.execute(db.delete(Customer))
        db.session.commit()
        report = import_csv(client, body)
        assert (report["created"], report["updated"]) == (1, 1)
        customer = customers_by_phone()["+254712000001"]
        assert (customer.first_name, customer.last_name, customer.location) == ("Amina", "Wanjiru", "Kisumu")


def test_a_row_of_commas_is_invalid_not_blank(client):
    report = import_csv(client, "phone,first_name,location\n,,\n,,,,,,\n\n   \n0712000001,Amina,Nairobi\n")
    assert report["created"] == 1
    assert report["errors"] == [
        {"line": 2, "reason": "phone: missing"},
        {"line": 3, "reason": "expected 3 fields, found 7"},
    ]


def test_an_overlong_line_is_an_invalid_row_and_the_rest_is_imported(client):
    body = "phone,first_name\n0712000001,Amina\n" + "," * 1_000_000 + "\n" + "0712000002,Brian\n"
    report = import_csv(client, body)
    assert (report["created"], report["invalid"]) == (2, 1)
    [error] = report["errors"]
    assert error["line"] == 3
    assert error["reason"].startswith("row longer than ")
    assert set(customers_by_phone()) == {"+254712000001", "+254712000002"}


def test_an_overlong_quoted_record_is_invalid_from_its_first_line(client):
    body = 'phone,first_name\n0712000001,Amina\n0712000002,"' + "x\n" * 200_000 + '"\n'
    report = import_csv(client, body)
    assert report["errors"][0]["line"] == 3
    assert report["errors"][0]["reason"].startswith("row longer than ")
    assert "+254712000001" in customers_by_phone()


def test_errors_in_a_multi_line_record_name_the_line_where_it_began(client):
    body = (
        "phone,first_name\n"
        '0712000001,"Amina\nOtieno",extra\n'  # three fields, lines 2-3
        '0712000002,"Brian\nKamau"\rx\n'  # not CSV (a bare carriage return), lines 4-5
        "0712000003,Cynthia\n"
    )
    report = import_csv(client, body)
    assert [e["line"] for e in report["errors"]] == [2, 4]
    assert report["errors"][0]["reason"] == "expected 2 fields, found 3"
    assert report["errors"][1]["reason"].startswith("not a CSV row")
    assert set(customers_by_phone()) == {"+254712000003"}


def test_a_header_with_a_million_unknown_columns_gets_a_short_422(client):
    body = "phone," + ",".join(f"c{n}" for n in range(1_000_000)) + "\n"
    response = client.post("/customers/import", data=body, content_type="text/csv")
    assert response.status_code == 422
    assert len(response.get_data()) < 2000
    assert customers_by_phone() == {}


def test_a_header_with_many_bad_columns_names_a_few(client):
    body = "phone," + ",".join(f"c-{n}" for n in range(500)) + "\n0712000001" + "," * 500 + "\n"
    response = client.post("/customers/import", data=body, content_type="text/csv")
    assert response.status_code == 422
    message = response.get_json()["message"]
    assert "c-0, c-1" in message and "490 more" in message
    assert len(message) < 1000


def test_phone_extensions_are_invalid_rows(client):
    body = "phone,first_name\n+254711000352;ext=12,A\n0711000350x,B\n0711000351 ext. 4,C\n0711000353,D\n"
    report = import_csv(client, body)
    assert (report["created"], report["invalid"]) == (1, 3)
    assert [e["line"] for e in report["errors"]] == [2, 3, 4]
    assert all("extension" in e["reason"] for e in report["errors"])


def test_a_phone_over_16_characters_is_imported_with_its_batch(client):
    body = "phone,first_name\n0712000001,Amina\n+49335199080462505,Jonas\n0712000002,Brian\n"
    report = import_csv(client, body)
    assert (report["created"], report["invalid"]) == (3, 0)
    assert "+49335199080462505" in customers_by_phone()


@pytest.mark.real_only
def test_a_row_the_database_refuses_costs_only_itself(client, app):
    app.config["IMPORT_BATCH_SIZE"] = 100
    db.session.execute(text("ALTER TABLE customers ADD CONSTRAINT test_refused CHECK (first_name <> 'Refused')"))
    db.session.commit()
    try:
        lines = "".join(f"07120{n:05d},{'Refused' if n == 7 else f'N{n}'}\n" for n in range(1, 11))
        report = import_csv(client, "phone,first_name\n" + lines)
    finally:
        db.session.rollback()
        db.session.execute(text("ALTER TABLE customers DROP CONSTRAINT test_refused"))
        db.session.commit()
    assert (report["created"], report["invalid"]) == (9, 1)
    assert report["errors"] == [{"line": 8, "reason": "the database refused this row"}]
    assert len(customers_by_phone()) == 9


def run_concurrently(app, bodies: list[bytes]) -> list:
    """Import each body in its own thread, app context and session, all at once; returns each
    report, or the exception it raised."""
    from app.customers.csv_import import import_customers

    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def run(index: int) -> None:
        with app.app_context():
            barrier.wait()
            try:
                results[index] = import_customers(io.BytesIO(bodies[index]))
            except Exception as exc:  # noqa: BLE001 - the test reports it
                results[index] = exc
            finally:
                db.session.remove()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.real_only
def test_concurrent_imports_of_the_same_phones_neither_deadlock_nor_miscount(app):
    app.config["IMPORT_BATCH_SIZE"] = 500
    phones = [f"+2547{n:08d}" for n in range(5000)]
    # The same phones batch by batch, each batch's in the opposite order: concurrent batches hold the
    # same rows and meet head on.
    backward_blocks = [p for start in range(0, 5000, 500) for p in reversed(phones[start : start + 500])]
    forward = ("phone,first_name\n" + "".join(f"{p},A\n" for p in phones)).encode()
    backward = ("phone,first_name\n" + "".join(f"{p},B\n" for p in backward_blocks)).encode()
    for trial in range(6):
        db.session.execute(text("TRUNCATE customers RESTART IDENTITY CASCADE"))
        db.session.commit()
        results = run_concurrently(app, [forward, backward])
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"trial {trial}: {errors!r}"
        assert sum(r.created for r in results) == 5000, f"trial {trial}"
        assert sum(r.updated for r in results) == 5000, f"trial {trial}"
        db.session.rollback()
        assert db.session.scalar(db.select(db.func.count()).select_from(Customer)) == 5000


@pytest.mark.real_only
def test_a_200k_row_file_is_imported_synchronously_through_the_web_process(app, spawn_web):
    web = spawn_web()
    lines = "".join(f"+2547{n:08d},F{n},L{n},Nairobi,P{n % 50}\n" for n in range(200_000))
    body = ("phone,first_name,last_name,location,preferred_product\n" + lines).encode()
    assert 8_000_000 < len(body) < 10 * 2**20  # answered synchronously
    status, _, answer = raw_request(
        web, "POST", "/customers/import", body, {"Authorization": f"Bearer {TEST_API_KEY}", "Content-Type": "text/csv"}
    )
    assert status == 200, answer[:2000]
    assert json.loads(answer) == {
        "created": 200_000,
        "updated": 0,
        "invalid": 0,
        "errors": [],
        "errors_truncated": False,
    }
