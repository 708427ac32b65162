"""The declarative settings validator: types from annotations, ranges from `setting`, messages naming section.key,
the value and what is expected; unknown keys of a section refused."""

from __future__ import annotations

import dataclasses

import pytest

from deepseekmoe_jax.validation import INT_MAX, ConfigError, check_section_keys, check_settings, setting


@dataclasses.dataclass(frozen=True)
class Toy:
    count: int = setting(1, ge=1)
    rate: float = setting(0.5, gt=0, le=1)
    mode: str = setting("a", choices=("a", "b"))
    name: str | None = setting(None, nonempty=True, note="a directory")
    devices: int = setting(1, ge=1, also=(-1,), note="-1: all")
    points: tuple[float, ...] = setting((0.5,), gt=0, lt=1)
    flag: bool = False

    def __post_init__(self):
        check_settings(self, "toy")


def test_valid_values_are_normalised():
    toy = Toy(rate=1, points=[0.25, 0.75], devices=-1)
    assert toy.rate == 1.0 and isinstance(toy.rate, float)
    assert toy.points == (0.25, 0.75)
    assert toy.devices == -1 and toy.name is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 0}, "toy.count=0: expected an integer >= 1"),
        ({"count": 2.0}, "toy.count=2.0: expected an integer >= 1"),
        ({"count": True}, "toy.count=True: expected an integer >= 1"),
        ({"count": INT_MAX + 1}, f"toy.count={INT_MAX + 1}: expected an integer >= 1 and <= {INT_MAX}"),
        ({"rate": 0}, "toy.rate=0: expected a number in (0, 1]"),
        ({"rate": float("inf")}, "toy.rate=inf: expected a number in (0, 1]"),
        ({"rate": "0.5"}, "toy.rate='0.5': expected a number in (0, 1]"),
        ({"mode": "c"}, "toy.mode='c': expected one of ['a', 'b']"),
        ({"name": ""}, "toy.name='': expected a non-empty string or null (a directory)"),
        ({"devices": -2}, "toy.devices=-2: expected an integer >= 1 or -1 (-1: all)"),
        ({"points": [0.5, 1.0]}, "toy.points=[0.5, 1.0]: expected a list of numbers in (0, 1)"),
        ({"flag": "false"}, "toy.flag='false': expected true or false"),
    ],
)
def test_invalid_values_name_section_key_value_and_expectation(kwargs, message):
    with pytest.raises(ConfigError) as err:
        Toy(**kwargs)
    assert str(err.value) == message


def test_section_keys():
    assert check_section_keys(Toy, None, "toy") == {}
    assert check_section_keys(Toy, {"count": 3}, "toy") == {"count": 3}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\] in 'toy'; known keys are \['count'"):
        check_section_keys(Toy, {"bogus": 1, "count": 3}, "toy")
    with pytest.raises(ConfigError, match="'toy': expected a mapping of settings, found 3"):
        check_section_keys(Toy, 3, "toy")
