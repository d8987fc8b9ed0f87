"""quality.verdicts_by_base: per seed base the median, its exact order-statistic interval and verdict, and one
verdict across bases, checked against values whose medians are known by hand."""

from iclsim import quality


def test_verdicts_by_base_by_hand():
    """Base A: 9 values 1..9 (median 5; with 9 values the 95% interval is x_(2)..x_(8) = [2, 8], coverage
    1 - 2 (1 + 9) / 512): supported. Base B the same shifted below 0: contradicted; so across bases
    unstable. A base with no passing seed is said so, and positive claims read the sign the other way
    round. Planted bugs caught: the interval of the mean, bases verdicts not combined, an empty base crashing."""
    a = list(range(1, 10))
    out = quality.verdicts_by_base({"A": a, "B": [v - 10 for v in a]})
    assert out["A"]["median"] == 5 and out["A"]["median_interval"] == [2, 8] and out["A"]["passing_seeds"] == 9
    assert out["A"]["median_coverage"] == round(1 - 2 * 10 / 512, 4) and out["A"]["mean"] == 5
    assert (out["A"]["verdict"], out["B"]["verdict"]) == ("supported", "contradicted")
    assert out["across_bases"] == quality.UNSTABLE
    both = quality.verdicts_by_base({"A": a, "B": a}, supports_if_positive=False)
    assert both["A"]["verdict"] == "contradicted" and both["across_bases"] == "contradicted"
    empty = quality.verdicts_by_base({"A": [], "B": a})
    assert empty["A"] == {"passing_seeds": 0, "verdict": "not resolved: no passing seed"}
    assert empty["across_bases"] == quality.UNSTABLE
