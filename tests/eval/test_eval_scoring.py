"""Answer extraction and scorers."""

from __future__ import annotations

import pytest

from shoal.eval.scoring import (answer_match, exact_match, extract_number, is_number,
                                number_match)


@pytest.mark.parametrize("output, expected", [
    ("7", "7"),
    (" 7 .", "7"),
    ("the answer is 12 apples", "12"),          # leading and trailing text
    ("-3 left", "-3"),                          # negative number
    ("x = -3", "-3"),
    ("007", "7"),
    ("7.0", "7"),
    ("2.50 dollars", "2.5"),
    ("1,234 people", "1234"),                   # thousands separators
    ("3, 4, 5", "3"),                           # a list is not one number
    ("7.", "7"),                                # sentence-final full stop
    ("no number here", None),
    ("", None),
    ("12345678901234567890", "12345678901234567890"),  # exact for long integers
])
def test_extract_number(output, expected):
    assert extract_number(output) == expected


@pytest.mark.parametrize("output, target, expected", [
    ("7 .", "7", 1.0),
    ("it is 7 and then 8", "7", 1.0),       # first number counts
    ("8 then 7", "7", 0.0),
    ("no idea", "7", 0.0),                  # no number in the output
    ("-4", "-4", 1.0),
    ("4", "-4", 0.0),
    ("7.0", "7", 1.0),
    ("", "0", 0.0),
])
def test_number_match(output, target, expected):
    assert number_match(output, target) == expected


@pytest.mark.parametrize("output, target, stop, expected", [
    ("Blue  Red .", "blue red", ".", 1.0),
    ("blue red . green", "blue red", ".", 1.0),   # extra text after the stop
    ("blue red green", "blue red", ".", 0.0),     # extra text without a stop
    ("blue red\ngreen", "blue red", None, 1.0),   # the first line only
    ("", "blue", None, 0.0),
])
def test_exact_match(output, target, stop, expected):
    assert exact_match(output, target, stop=stop) == expected


def test_answer_match_picks_the_scorer_from_the_target():
    assert is_number(" -12 ") and is_number("1,000") and not is_number("12 apples")
    assert answer_match("12 apples", "12") == 1.0
    assert answer_match("red blue", "red blue") == 1.0
    assert answer_match("red blue green", "red blue") == 0.0
