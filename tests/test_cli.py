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


def test_student_config_that_is_not_a_json_object_is_refused_at_parsing(capsys, tmp_path):
    # refused by argparse, naming the option, before the teacher or any pair is read (the files do not exist)
    base = ["distill", "--family", "var", "--tokenizer", str(tmp_path / "t.pt"), "--model", str(tmp_path / "m.pt"),
            "--pairs", str(tmp_path / "index.json"), "--out", str(tmp_path / "out"), "--timesteps", "1"]
    for bad, words in (("[1, 2]", "expected a JSON object"), ("{within", "not JSON")):
        try:
            main(base + ["--student-config", bad])
        except SystemExit as e:
            assert e.code == 2
        err = capsys.readouterr().err
        assert "--student-config" in err and words in err
