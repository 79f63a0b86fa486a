import pytest

from app.customers.phones import InvalidPhone, normalize_phone


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("0712345678", "+254712345678"),
        ("+254 712 345 678", "+254712345678"),
        ("254712345678", "+254712345678"),
        ("+1 650-253-0000", "+16502530000"),
    ],
)
def test_numbers_are_stored_in_e164(raw, expected):
    assert normalize_phone(raw, "KE") == expected


@pytest.mark.parametrize("raw", ["", "hello", "12", "0712", "+999 123", "1" * 40])
def test_invalid_numbers_are_rejected(raw):
    with pytest.raises(InvalidPhone):
        normalize_phone(raw, "KE")


def test_default_region_decides_local_numbers():
    assert normalize_phone("020 7946 0018", "GB") == "+442079460018"
