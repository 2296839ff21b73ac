"""`python -m unimodal.bench`: the subcommands, and one-line refusals."""

import pytest

from unimodal.bench import __main__ as bench_cli


def test_bench_names_its_subcommands_and_refuses_unknown_ones(capsys):
    assert bench_cli.main(["--help"]) == 0
    assert bench_cli.main(["nonsense"]) == 2
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("train", "sample", "tokenizer", "data", "profile"))


@pytest.mark.parametrize("target", ["train", "sample", "profile"])
def test_bench_refuses_a_model_size_the_config_refuses_in_one_line(target, capsys):
    args = [target] + (["sample"] if target == "profile" else []) + ["--n-heads", "4", "--n-kv-heads", "3"]
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(args)
    assert exit_info.value.code == 2
    assert "n_kv_heads (3) must be positive and divide n_heads (4)" in capsys.readouterr().err
