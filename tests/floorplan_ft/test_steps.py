import pytest

from floorplan_ft.steps import ALL_STEPS, parse_steps


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", list(ALL_STEPS)),
        (None, list(ALL_STEPS)),
        ("0,1", ["0", "1"]),
        ("3", ["3a", "3b"]),
        ("5,0, 3a", ["0", "3a", "5"]),
        ("2-4", ["2", "3a", "3b", "4"]),
        ("3b-5", ["3b", "4", "5"]),
        (["1", "6"], ["1", "6"]),
    ],
)
def test_parse_steps(spec, expected):
    assert parse_steps(spec) == expected


@pytest.mark.parametrize("spec, message", [("0,7", "unknown step '7'"), ("5-2", "backwards"), (",", "no step")])
def test_bad_steps(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(spec)
