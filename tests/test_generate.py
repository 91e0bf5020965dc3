"""``python -m daemon generate``: sampling the exported model from the command line."""

from __future__ import annotations

import pytest

from daemon.__main__ import main


def test_generate_prints_the_prompt_and_the_same_continuation_for_the_same_seed(exported, capsys):
    argv = ["generate", "def ", "--output_dir", str(exported), "--max_new_tokens", "6", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("def ") and len(first.out) > len("def \n")
    assert not first.out.startswith("def  ")  # the trailing space is not doubled
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out


def test_generate_without_an_exported_model_says_so_in_one_line(tmp_path, capsys):
    assert main(["generate", "def ", "--output_dir", str(tmp_path / "current_model")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no exported model in ") and err.count("\n") == 1 and "Traceback" not in err


def test_generate_refuses_a_temperature_of_zero(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "def ", "--temperature", "0"])
    assert exited.value.code == 2 and "--temperature must be > 0" in capsys.readouterr().err
