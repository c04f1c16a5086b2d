"""Answer scores on hand-made cases."""

import pytest

from lorakit.metrics import contains, exact_match, normalize, rouge_l


def test_normalize_and_exact_match():
    assert normalize("  The VPN, is: ON! ") == "the vpn is on"
    assert exact_match("Harbor-7.", "harbor 7") == 1.0
    assert exact_match("Harbor-8", "Harbor-7") == 0.0


def test_contains_whole_words_any_of_several():
    assert contains("Call ext. 4410 for help.", "4410") == 1.0
    assert contains("Call ext. 44100 for help.", "4410") == 0.0
    assert contains("It takes 42 days.", ["six weeks", "42 days"]) == 1.0
    assert contains("anything", "") == 0.0


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("a b c d", "a c e") = 2 -> P = 2/4, R = 2/3, F = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0
