"""toe.curriculum: EfficientTrain's phase table, user tables, lookups at the phase boundaries, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toe.curriculum import Curriculum, Phase

PAPER_TABLE = "0:160:1,60:160:3,120:160:5,180:192:7,240:224:9"


def _table(c: Curriculum):
    return [(p.start_epoch, p.input_size, p.magnitude) for p in c.phases]


def test_efficienttrain_224_patch16_is_the_published_table():
    c = Curriculum.efficienttrain(300, 224, 16)
    assert _table(c) == [(0, 160, 1), (60, 160, 3), (120, 160, 5), (180, 192, 7), (240, 224, 9)]
    assert c.to_table() == PAPER_TABLE
    assert c == Curriculum.parse(PAPER_TABLE, 16)


def test_efficienttrain_64_patch8_rounds_to_the_nearest_multiple():
    # 64 x 5/7 = 45.7 and 64 x 6/7 = 54.9: the nearest multiples of 8 are 48 and 56 (floor would give 40, 48)
    c = Curriculum.efficienttrain(300, 64, 8)
    assert [p.input_size for p in c.phases] == [48, 48, 48, 56, 64]
    # 224 x 5/7 = 160 exactly: with patch 14 the nearest multiple is 154 (11 patches), not 168
    assert [p.input_size for p in Curriculum.efficienttrain(300, 224, 14).phases] == [154, 154, 154, 196, 224]


@pytest.mark.parametrize("epochs", [5, 7, 12, 299, 300, 301])
def test_efficienttrain_phase_starts_split_the_epochs_evenly(epochs):
    c = Curriculum.efficienttrain(epochs, 224, 16)
    # Reference: phase i holds the epochs e with floor(5 e / epochs) == i (the integer split of Schedule).
    expected = [min(e for e in range(epochs) if (5 * e) // epochs == i) for i in range(5)]
    assert list(c.phase_starts()) == expected
    lengths = c.phase_lengths(epochs)
    assert sum(lengths) == epochs and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_efficienttrain_shorter_than_five_epochs_keeps_the_phases_that_run(epochs):
    c = Curriculum.efficienttrain(epochs, 224, 16)
    sizes, magnitudes = [160, 160, 160, 192, 224], [1, 3, 5, 7, 9]
    for e in range(epochs):  # epoch e is in EfficientTrain phase floor(5 e / epochs)
        i = (5 * e) // epochs
        assert (c.input_size(e), c.magnitude(e)) == (sizes[i], magnitudes[i]), (epochs, e)
    assert len(c.phases) == epochs and all(n == 1 for n in c.phase_lengths(epochs))
    assert _table(Curriculum.efficienttrain(1, 32, 4)) == [(0, 24, 1)]  # SMOKE's one epoch at 32 px


def test_lookups_at_the_phase_boundaries():
    c = Curriculum.efficienttrain(300, 224, 16)
    expected = {0: (1, 160, 1), 59: (1, 160, 1), 60: (2, 160, 3), 179: (3, 160, 5), 180: (4, 192, 7),
                239: (4, 192, 7), 240: (5, 224, 9), 299: (5, 224, 9), 1000: (5, 224, 9)}
    for epoch, (phase, size, m) in expected.items():
        assert (c.phase(epoch), c.input_size(epoch), c.magnitude(epoch)) == (phase, size, m), epoch
    assert c.rand_augment(0) == "rand-m1-mstd0.5-inc1" and c.rand_augment(250) == "rand-m9-mstd0.5-inc1"
    assert c.phase_lengths(300) == [60, 60, 60, 60, 60]
    assert c.phase_lengths(200) == [60, 60, 60, 20, 0]


def test_parse_user_table_and_whitespace():
    c = Curriculum.parse(" 0:32:2 , 3:48:4,10:64:9", 16)
    assert _table(c) == [(0, 32, 2), (3, 48, 4), (10, 64, 9)]
    assert (c.phase(2), c.phase(3), c.phase(9), c.phase(10)) == (1, 2, 2, 3)
    assert c.patch_size == 16 and c.phase_starts() == [0, 3, 10]
    assert Curriculum.parse("0:224:9").phases == (Phase(0, 224, 9),)


@pytest.mark.parametrize("table, needle", [
    ("", "table"),
    ("0:160", "'0:160' is not start:size:magnitude"),
    ("0:160:1:2", "is not start:size:magnitude"),
    ("0:160:x", "is not start:size:magnitude"),
    ("0:160:1,", "'' is not start:size:magnitude"),
    ("5:160:1", "start at epoch 0"),
    ("0:160:1,60:192:3,60:224:5", "strictly increasing"),
    ("0:160:1,60:150:3", "150 is not a positive multiple of patch_size 16"),
    ("0:0:1", "0 is not a positive multiple"),
    ("0:160:-1", "magnitude must be >= 0"),
])
def test_parse_errors_name_the_table(table, needle):
    with pytest.raises(ValueError) as err:
        Curriculum.parse(table, 16)
    assert needle in str(err.value) and "table" in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochs": 0, "final_size": 224, "patch_size": 16}, "epochs"),
    ({"epochs": 300.0, "final_size": 224, "patch_size": 16}, "epochs"),
    ({"epochs": 300, "final_size": 200, "patch_size": 16}, "final_size"),
    ({"epochs": 300, "final_size": 0, "patch_size": 16}, "final_size"),
    ({"epochs": 300, "final_size": 224, "patch_size": 0}, "patch_size"),
])
def test_efficienttrain_errors_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Curriculum.efficienttrain(**kwargs)


def test_value_object_validation_and_lookup_errors():
    with pytest.raises(ValueError, match="phases"):
        Curriculum(())
    with pytest.raises(ValueError, match="phases"):
        Curriculum(((0, 160, 1),))  # tuples are not Phase
    with pytest.raises(ValueError, match="patch_size"):
        Curriculum((Phase(0, 160, 1),), patch_size=0)
    with pytest.raises(ValueError, match="patch_size"):
        Curriculum.parse("0:160:1", 0)
    c = Curriculum((Phase(0, 160, 1),), 16)
    with pytest.raises(ValueError, match="epoch"):
        c.phase(-1)
    with pytest.raises(ValueError, match="epochs"):
        c.phase_lengths(0)
    with pytest.raises(AttributeError):
        c.patch_size = 8  # frozen


def test_importing_the_curriculum_needs_no_torch():
    code = "import sys, toe.curriculum; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
