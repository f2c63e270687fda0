import subprocess
import sys

from dd.__main__ import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_subcommand_is_rejected(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown subcommand 'no-such-command'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "dd", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "verify-golden" in r.stdout
