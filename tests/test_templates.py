import pytest

from app.messaging.templates import compile_template, fixed_text, render, unknown_placeholders


def test_render_fills_every_placeholder():
    fields = {"first_name": "Amina", "last_name": "Otieno", "preferred_product": "Sneakers", "location": "Nairobi"}
    assert (
        render("Hi {first_name} {last_name} in {location}: {preferred_product}!", fields)
        == "Hi Amina Otieno in Nairobi: Sneakers!"
    )


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n"])
def test_missing_or_blank_value_renders_unknown(value):
    assert render(
        "Hi {first_name}, check out {preferred_product}", {"first_name": value, "preferred_product": "Shoes"}
    ) == ("Hi [unknown], check out Shoes")


def test_absent_field_renders_unknown():
    assert render("{location}", {}) == "[unknown]"


def test_values_are_not_parsed_as_templates():
    assert render("{first_name} {last_name}", {"first_name": "{last_name}", "last_name": "X"}) == "{last_name} X"


def test_unknown_placeholders_are_named_once_in_order():
    assert unknown_placeholders("Hi {nickname}, {first_name} {age} {nickname}") == ["{nickname}", "{age}"]


def test_text_without_placeholders_is_left_alone():
    assert unknown_placeholders("50% off, today only") == []
    assert render("50% off", {}) == "50% off"


@pytest.mark.parametrize(
    "template",
    [
        "Hi {first_name}, check out {preferred_product}",
        "{location}{location} {last_name}",
        "Braces { and } stay, {first_name} }{",
        "No placeholder at all",
        "",
        "{first_name}",
        "Hi {first_name|there}, {attributes.tier|member} {attributes.spend} {attributes.vip} {last_name|}",
        "{attributes.tier}{attributes.missing|none} {attributes.Bad} {first_name|a|b}",
    ],
)
@pytest.mark.parametrize(
    "values",
    [
        ("Amina", "Otieno", "Sneakers", "Nairobi", {"tier": "gold", "spend": 1250.5, "vip": True}),
        (None, "", "   ", "{location}", {}),
        ("Zoë’s 😀", 42, None, "Kisumu", {"tier": " ", "spend": 3.0, "vip": False}),
        ("Amina", None, None, None, None),
    ],
)
def test_a_compiled_template_renders_as_render_does(template, values):
    names = ("first_name", "last_name", "preferred_product", "location", "attributes")
    assert compile_template(template, names)(values) == render(template, dict(zip(names, values, strict=True)))


def test_attributes_render_as_text_and_a_missing_one_as_unknown():
    fields = {"first_name": "Amina", "attributes": {"tier": "gold", "spend": 1250.5, "orders": 3.0, "vip": False}}
    template = (
        "{first_name}: {attributes.tier}, {attributes.spend}, {attributes.orders}, {attributes.vip}, {attributes.x}"
    )
    assert render(template, fields) == "Amina: gold, 1250.5, 3, false, [unknown]"


def test_a_fallback_replaces_a_missing_or_blank_value_only():
    template = "Hi {first_name|there}, {attributes.tier|member} {last_name|}!"
    assert render(template, {"first_name": " ", "attributes": {}}) == "Hi there, member !"
    assert render(template, {"first_name": "Amina", "last_name": "O", "attributes": {"tier": "gold"}}) == (
        "Hi Amina, gold O!"
    )


def test_unknown_fields_bad_attribute_names_and_bad_fallbacks_are_refused():
    template = "{nickname|x} {attributes.Tier} {attributes.} {first_name|a|b} {first_name|" + "x" * 101 + "}"
    assert unknown_placeholders(template) == [
        "{nickname|x}",
        "{attributes.Tier}",
        "{attributes.}",
        "{first_name|a|b}",
        "{first_name|" + "x" * 101 + "}",
    ]
    assert unknown_placeholders("{first_name|" + "x" * 100 + "} {attributes.any_name_at_all}") == []


def test_fixed_text_drops_only_the_known_placeholders():
    assert fixed_text("Hi {first_name}, {location} { here }") == "Hi ,  { here }"
    assert fixed_text("Hi {first_name|there} {attributes.tier}{nickname}") == "Hi  {nickname}"
