"""The recipes' numeric arguments are checked by argparse (an error naming the range, exit code 2), not passed on to
torch.set_num_threads / the data loaders as they are (``--threads -1`` was a RuntimeError traceback)."""
import pytest

from sparseprune.recipes import digits, minilm


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "0"], ["--steps", "0"], ["--block", "-8"],
                                  ["--threads", "two"]])
def test_digits_recipe_refuses_bad_counts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        digits.main(argv)
    assert e.value.code == 2
    assert "must be an integer in" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["distill", "--run", "r", "--threads", "-1"], ["distill", "--run", "r", "--calib", "0"],
                                  ["distill", "--run", "r", "--pairs", "-3"], ["evaluate", "--run", "r", "--repeats", "0"],
                                  ["time", "--run", "r", "--threads", "0"], ["tradeoff", "--run", "r", "--threads", "x"]])
def test_minilm_recipe_refuses_bad_counts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        minilm.main(argv)
    assert e.value.code == 2
    assert "must be an integer in" in capsys.readouterr().err
