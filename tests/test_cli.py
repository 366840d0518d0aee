import subprocess
import sys

import pytest

from client.cli import COMMANDS, main


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: blindhub" in capsys.readouterr().err


def test_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in result.stdout
