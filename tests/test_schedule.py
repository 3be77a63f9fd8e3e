"""toe.Schedule: stage boundaries, Eq. 1 keep rates, validation."""
import pytest

from toe import Schedule


def test_equal_stage_boundaries_300_epochs():
    s = Schedule(r1=0.5, ng=3, k=2, epochs=300)
    assert [s.stage(e) for e in (0, 99, 100, 199, 200, 299)] == [1, 1, 2, 2, 3, 3]
    assert s.stage(10_000) == 3  # past the schedule's span: all tokens
    assert s.stage_starts() == [0, 100, 200] and s.stage_lengths() == [100, 100, 100]


def test_uneven_split_matches_the_formula():
    s = Schedule(r1=0.4, ng=3, epochs=10)
    stages = [s.stage(e) for e in range(10)]
    assert stages == [min(3, (3 * e) // 10 + 1) for e in range(10)]
    assert sum(s.stage_lengths()) == 10
    assert s.stage_lengths() == [stages.count(d) for d in (1, 2, 3)]


def test_keep_rates_eq1():
    s = Schedule(r1=0.5, ng=3, epochs=300)
    assert s.r0 == 0.25
    assert s.rates(1) == [0.25, 0.5]
    assert s.rates(2) == [0.25, 0.5, 0.75]
    assert s.rates(3) == [0.25, 0.5, 0.75, 1.0]
    s4 = Schedule(r1=0.4, ng=4, r0=0.1, epochs=8)
    assert s4.rates(4)[-1] == 1.0
    assert s4.rates(3) == pytest.approx([0.1, 0.4, 0.6, 0.8])
    assert [s4.keep_rate(e) for e in range(8)] == pytest.approx([0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0])


def test_num_tokens_is_rounding_safe():
    s = Schedule(r1=0.4, ng=4, epochs=4)  # stage 3 rate 0.4 + 2 * 0.2 = 0.8000000000000002 or 0.7999...
    assert [s.num_tokens(e, 196) for e in range(4)] == [78, 117, 156, 196]
    assert Schedule(r1=0.7 - 0.4, ng=2, epochs=2).num_tokens(0, 10) == 3


def test_explicit_stage_epochs():
    s = Schedule(r1=0.5, ng=3, epochs=300, stage_epochs=[0, 50, 250])
    assert [s.stage(e) for e in (0, 49, 50, 249, 250)] == [1, 1, 2, 2, 3]
    assert s.stage_lengths() == [50, 200, 50]


def test_single_stage_only_full():
    s = Schedule(r1=1.0, ng=1, epochs=5)
    assert s.keep_rate(0) == 1.0
    with pytest.raises(ValueError, match="ng=1"):
        Schedule(r1=0.5, ng=1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(r1=0.0), "r1"), (dict(r1=1.5), "r1"), (dict(r1=-0.1), "r1"),
    (dict(r1=0.5, r0=0.6), "r0"), (dict(r1=0.5, r0=0.0), "r0"),
    (dict(r1=0.5, ng=0), "ng"), (dict(r1=0.5, k=0), "k"),
    (dict(r1=0.5, ng=3, epochs=2), "epochs"),
    (dict(r1=0.5, stage_epochs=[1, 100, 200]), "stage_epochs"),
    (dict(r1=0.5, stage_epochs=[0, 100, 100]), "stage_epochs"),
    (dict(r1=0.5, stage_epochs=[0, 100]), "stage_epochs"),
])
def test_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Schedule(**kwargs)


def test_bad_epoch_and_stage():
    s = Schedule(r1=0.5)
    with pytest.raises(ValueError, match="epoch"):
        s.stage(-1)
    with pytest.raises(ValueError, match="stage"):
        s.rates(4)
