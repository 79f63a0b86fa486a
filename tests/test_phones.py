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


@pytest.mark.parametrize(
    "raw",
    ["+254711000352;ext=12", "0711000350x", "0711000350 x12", "0711000350 ext. 12", "0711000350#", "+254711000352,1"],
)
def test_extensions_are_refused(raw):
    with pytest.raises(InvalidPhone, match="extension"):
        normalize_phone(raw, "KE")


def test_valid_numbers_over_15_digits_are_kept_whole():
    assert normalize_phone("+49335199080462505", "KE") == "+49335199080462505"
    assert normalize_phone("+49 3351 99080462505", "KE") == "+49335199080462505"
