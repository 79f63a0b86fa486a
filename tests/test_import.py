"""Bulk import of customers: the API (text/csv or multipart) and `flask customers import`."""

import io

from app.extensions import db
from app.models import Customer
from tests.factories import make_customer

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
        ("phone,frist_name\n0712000001,A\n", "frist_name"),
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
