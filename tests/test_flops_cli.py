"""toe.flops_cli: the command line of toe.flops (python -m toe.flops, the installed toe-flops) and the comparison
with the paper's GFLOPs columns. The counts it prints are checked against closed forms in test_flops.py."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import models  # noqa: F401  (this repository's LV-ViT, registered with timm; toe never imports it)
from test_flops import _lvvit_macs, _tokens, _vit_macs
from toe import flops, flops_cli, paper
from toe.flops import gflops_per_iteration
from toe.flops_cli import main, paper_tables

ROOT = Path(__file__).resolve().parents[1]


def test_table8_layers_via_paper_tables():
    results = paper_tables(["8"])
    rows = results[0]["rows"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    for row, printed in zip(rows, (2.51e3, 2.58e3, 2.65e3, 2.71e3)):
        assert abs(row["gflops"] - printed) <= 0.01 * printed, row
        assert row["tokens"] == [99, 148, 197] and row["agrees"]
    text = flops_cli.format_paper_tables(results)
    assert text.count("✓") == 4 and "4/4 computed values agree" in text


def test_cli_json_last_line(capsys):
    assert main(["--model", "deit_tiny_patch16_224", "--toe-r1", "0.5", "--toe-ng", "3", "--toe-k", "2",
                 "--batch-size", "1024", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "theoretical speedup" in "\n".join(out)
    data = json.loads(out[-1])
    assert [s["tokens"] for s in data["stages"]] == [99, 148, 197]
    assert abs(data["gflops"] - 2.58e3) <= 0.01 * 2.58e3
    assert data["speedup"] == pytest.approx(data["baseline"]["gflops"] / data["gflops"])


@pytest.mark.parametrize("argv, needle", [
    (["--curriculum-table", "0:160:1,60:150:3"], "150 is not a positive multiple of patch_size 16"),
    (["--curriculum-table", "0:160"], "start:size:magnitude"),
    (["--curriculum", "efficienttrain", "--curriculum-table", "0:160:1"], "not allowed with"),
    (["--curriculum", "bogus"], "--curriculum"),
    (["--curriculum", "efficienttrain", "--epochs", "0"], "--epochs must be >= 1"),
    (["--model-module", "no_such_module_xyz"], "no_such_module_xyz"),
    (["--toe-r1", "0.5", "--toe-stage-epochs", "0", "x"], "--toe-stage-epochs"),
    (["--toe-r1", "1.5"], "r1"),
    (["--model", "no_such_model"], "no_such_model"),
    (["--batch-size", "0"], "batch-size"),
    (["--bogus"], "--bogus"),
    (["--toe-r1", "abc"], "--toe-r1"),
])
def test_cli_bad_input(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_cli_curriculum_table_matches_fixed_size_counts(capsys):
    # DeiT-tiny at 64 px (patch 16): each phase's count equals the model created at that size
    assert main(["--model", "deit_tiny_patch16_224", "--img-size", "64", "--curriculum-table", "0:32:1,2:48:5,4:64:9",
                 "--epochs", "6", "--batch-size", "8", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    data = json.loads(out[-1])
    assert "curriculum average" in "\n".join(out) and data["curriculum"]["table"] == "0:32:1,2:48:5,4:64:9"
    fixed = [gflops_per_iteration("deit_tiny_patch16_224", None, batch_size=8, img_size=s)["gflops"] for s in (32, 48, 64)]
    assert [s["gflops"] for s in data["segments"]] == pytest.approx(fixed, rel=1e-12)
    assert data["gflops"] == pytest.approx(sum(fixed) / 3, rel=1e-12)
    assert data["baseline"]["gflops"] == pytest.approx(fixed[-1], rel=1e-12)


def test_cli_efficienttrain_deit_tiny_table4(capsys):
    for toe_flags, printed, thop_count in (([], 8.8e3, 8.679e3), (["--toe-r1", "0.6", "--toe-r0", "0.3"], 7.6e3, 7.443e3)):
        assert main(["--model", "deit_tiny_patch16_224", "--batch-size", "4096", "--epochs", "300",
                     "--curriculum", "efficienttrain", "--json"] + toe_flags) == 0
        data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert abs(data["gflops"] - printed) <= 0.03 * printed
        assert data["gflops"] == pytest.approx(thop_count, rel=2e-4)
        assert [s["input_size"] for s in data["segments"]][:1] == [160] and data["segments"][-1]["input_size"] == 224


@pytest.mark.slow
def test_table4_via_paper_tables():
    (entry,) = paper_tables(["4"])
    assert entry["batch_size"] == 4096
    got = {row["label"].split()[0] + " " + row["label"].split(maxsplit=1)[1]: row for row in entry["rows"]}
    expected = {"DeiT-tiny baseline": 1.325e4, "DeiT-tiny EfficientTrain": 8.68e3,
                "DeiT-tiny EfficientTrain+ToE r1=0.6": 7.44e3, "DeiT-small baseline": 5.22e4,
                "DeiT-small EfficientTrain": 3.42e4, "DeiT-small EfficientTrain+ToE r1=0.6": 2.93e4}
    assert set(got) == set(expected)
    for label, value in expected.items():
        row = got[label]
        assert row["gflops"] == pytest.approx(value, rel=2e-3), label
        assert abs(row["gflops"] - row["paper"]) <= 0.03 * row["paper"], label
        # only DeiT-tiny's two curriculum rows miss the printed rounding (explained in the table's note)
        assert row["agrees"] == (label not in ("DeiT-tiny EfficientTrain", "DeiT-tiny EfficientTrain+ToE r1=0.6"))
    assert "8.68e3" in entry["note"] and "7.44e3" in entry["note"]


def test_printed_numbers_have_one_source():
    from report import paper_results
    table4 = [1.3e4, 8.8e3, 7.6e3, 5.2e4, 3.4e4, 2.9e4]  # the paper's Table 4 GFLOPs column
    assert [r["paper"] for r in flops_cli._PAPER["4"]["rows"]] == table4
    assert [r["paper"]["gflops"] for r in paper_results.TABLES["4"]["rows"]] == table4
    assert [paper.value("4", g, r, "gflops") for g in paper.groups("4") for r in paper.rows("4", g)] == table4
    for table in ("2", "3", "8"):
        assert sorted(r["paper"] for r in flops_cli._PAPER[table]["rows"]) == \
            sorted(r["paper"]["gflops"] for r in paper_results.TABLES[table]["rows"])


def test_cli_model_module_registers_models(tmp_path, monkeypatch, capsys):
    (tmp_path / "toe_test_registry.py").write_text(
        "from timm.models import register_model\n"
        "from timm.models.vision_transformer import VisionTransformer\n\n\n"
        "@register_model\n"
        "def toe_test_vit(pretrained=False, img_size=32, dynamic_img_size=False, **timm_options):\n"
        "    return VisionTransformer(img_size=img_size, patch_size=4, embed_dim=64, depth=3, num_heads=2,\n"
        "                             num_classes=10, dynamic_img_size=dynamic_img_size)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--model-module", "toe_test_registry", "--model", "toe_test_vit", "--toe-r1", "0.5",
                 "--epochs", "30", "--batch-size", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["macs"] for s in data["stages"]] == [_vit_macs([65] + [1 + _tokens(r, 64)] * 2) for r in (0.5, 0.75, 1.0)]


def test_model_modules_are_imported_when_named():
    assert flops.import_model_modules(["models"]) == ["models"]
    with pytest.raises(ValueError, match="--model-module no_such_module_xyz"):
        flops.import_model_modules(["no_such_module_xyz"])


@pytest.mark.slow
def test_cli_lvvit_from_the_repository_root():
    # `python -m toe.flops --model-module models` run from the repository root counts LV-ViT
    out = subprocess.run([sys.executable, "-m", "toe.flops", "--model-module", "models", "--model", "lvvit_t",
                          "--img-size", "64", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(ROOT)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["baseline"]["macs"] == _lvvit_macs([17] * 12, dim=240, grid=4)


def _entry_point(name: str):
    """The function pyproject.toml's [project.scripts] names for ``name``, imported."""
    text = (ROOT / "pyproject.toml").read_text()
    (target,) = re.findall(rf'^{re.escape(name)}\s*=\s*"([^"]+)"', text, flags=re.M)
    module, _, function = target.partition(":")
    return getattr(__import__(module, fromlist=[function]), function)


def test_installed_command_names_itself_toe_flops(monkeypatch, capsys):
    console = _entry_point("toe-flops")
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/toe-flops", "--bogus"])
    with pytest.raises(SystemExit) as exc:
        console()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["toe-flops: error: unrecognized arguments: --bogus"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/toe-flops", "--model", "no_such_model"])
    assert console() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("toe-flops: error: unknown model 'no_such_model'")
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/toe-flops", "--help"])
    with pytest.raises(SystemExit) as exc:
        console()
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: toe-flops ")


def test_python_m_toe_flops_names_itself_so():
    out = subprocess.run([sys.executable, "-m", "toe.flops", "--bogus"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(ROOT)})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["python -m toe.flops: error: unrecognized arguments: --bogus"]


def test_paper_table_whose_models_are_missing_is_an_error(tmp_path):
    """--paper-tables --tables 3 where no module registers LV-ViT: the table is reported as not computed, with
    the reason, on stdout and as one error line, and the exit code is 2 (not "0/0 agree" and 0)."""
    shutil.copytree(ROOT / "toe", tmp_path / "toe", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "toe.flops", "--paper-tables", "--tables", "3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stdout.strip().splitlines()
    assert "  not computed: unknown model 'lvvit_t'" in "\n".join(lines)
    assert lines[-1] == "0/0 computed values agree with the paper; not computed: Table 3"
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m toe.flops: error: Table 3 not computed: unknown model "
                                               "'lvvit_t'") and "--model-module" in err[0]


def test_text_output_labels_patch_tokens_and_tokens_with_the_prefix(capsys):
    """log.txt's toe_tokens counts patch tokens; toe.flops prints that count as `patches` next to the tokens
    block `layer` processes (the class token included), and says which is which."""
    assert main(["--model", "deit_tiny_patch16_224", "--toe-r1", "0.5", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(line for line in out if "GFLOPs/iter" in line).split()
    rows = {line.split()[1]: line.split() for line in out if line.startswith("stage ")}
    for stage, keep in (("1", 0.5), ("2", 0.75), ("3", 1.0)):
        kept = _tokens(keep, 196)
        cells = dict(zip(header, rows[stage][2:]))
        assert (int(cells["patches"]), int(cells["tokens"])) == (kept, kept + 1), rows[stage]
    assert any("patches: patch tokens kept (main.py's log.txt toe_tokens)" in line and "1 prefix token" in line
               for line in out)
