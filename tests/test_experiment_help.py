"""The experiment scripts' ``--help`` shows each option's default once."""

import pytest

from experiments import convergence, digits_adaptation, transfer


@pytest.mark.parametrize("module", [transfer, convergence, digits_adaptation])
def test_experiment_help_shows_each_default_once(module, capsys):
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: runs/experiments/{module.__name__.rpartition('.')[2]})" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "MODNET_DATA_ROOT) (default:" not in text  # a default the help names is not repeated
