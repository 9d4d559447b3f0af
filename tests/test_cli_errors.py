"""What the CLI does with each kind of failure: our errors and the operating system's are one
line; anything else is a bug and reaches the user with its traceback and a line saying so."""
import subprocess
import sys
import textwrap

import pytest

from crate_alpha import cli
from crate_alpha.errors import CheckpointError, CrateAlphaError

BUG_HINT = "this looks like a bug; please report it with the traceback above"


def _command_raising(monkeypatch, fn):
    """Make ``crate-alpha released`` run ``fn`` (its function is looked up when the parser is built)."""
    monkeypatch.setattr(cli, "_released", lambda a: fn())


def _raise(e):
    def fn():
        raise e

    return fn


def test_our_error_is_one_line(monkeypatch, capsys):
    _command_raising(monkeypatch, _raise(CheckpointError("checkpoint x.pt does not exist")))
    assert cli.main(["released"]) == 2
    err = capsys.readouterr().err
    assert err == "crate-alpha: error: checkpoint x.pt does not exist\n"


def test_os_error_is_one_line(monkeypatch, capsys):
    _command_raising(monkeypatch, lambda: open("/no/such/dir/file.json"))
    assert cli.main(["released"]) == 2
    assert capsys.readouterr().err == "crate-alpha: error: No such file or directory: /no/such/dir/file.json\n"


@pytest.mark.parametrize("call, kind", [
    ("torch.nn.functional.interpolate(torch.zeros(1, 1, 4, 4), size=(2, 2), scale_factor=2.0)", ValueError),
    ("torch.zeros(2).view(3)", RuntimeError),
])
def test_a_bug_keeps_its_traceback(monkeypatch, call, kind):
    import torch

    _command_raising(monkeypatch, lambda: eval(call, {"torch": torch}))
    with pytest.raises(kind) as e:
        cli.main(["released"])
    assert not isinstance(e.value, CrateAlphaError)
    if sys.version_info >= (3, 11):
        assert any(BUG_HINT in note for note in e.value.__notes__)


def _script(call: str) -> subprocess.CompletedProcess:
    # a command that hits a bug inside torch, run as the user runs it: a process of its own
    code = textwrap.dedent(f"""
        import sys
        import torch
        from crate_alpha import cli

        def bad_command(a):
            {call}

        cli._released = bad_command
        sys.exit(cli.main(["released"]))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("call, line", [
    ("torch.nn.functional.interpolate(torch.zeros(1, 1, 4, 4), size=(2, 2), scale_factor=2.0)",
     "ValueError: only one of size or scale_factor should be defined"),
    ("torch.zeros(2).view(3)", "RuntimeError: shape '[3]' is invalid for input of size 2"),
])
def test_a_bug_inside_torch_reaches_the_user_with_its_traceback(call, line):
    r = _script(call)
    assert r.returncode != 0 and r.returncode != 2, r.stderr
    assert "Traceback (most recent call last)" in r.stderr
    assert "bad_command" in r.stderr and line in r.stderr
    if "interpolate" in call:  # the frame inside torch that raised it
        assert "torch/nn/functional.py" in r.stderr.replace("\\", "/")
    assert "crate-alpha: error:" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"crate-alpha: {BUG_HINT}")


def test_hint_after_the_traceback_without_exception_notes(monkeypatch, capsys):
    # Python 3.10 has no add_note: the line is printed by the interpreter's hook, after the traceback
    class NoNotes(Exception):
        @property
        def add_note(self):
            raise AttributeError("add_note")

    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda *info: printed.append(info[1]))
    _command_raising(monkeypatch, _raise(NoNotes("inner")))
    with pytest.raises(NoNotes) as e:
        cli.main(["released"])
    sys.excepthook(NoNotes, e.value, None)
    assert printed == [e.value] and capsys.readouterr().err.strip().endswith(BUG_HINT + " and the command line")


def test_argparse_interrupt_and_exit_as_before(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    _command_raising(monkeypatch, _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as k:
        cli.main(["released"])
    assert not getattr(k.value, "__notes__", None)  # an interrupt is not a bug
    _command_raising(monkeypatch, _raise(SystemExit(3)))
    with pytest.raises(SystemExit) as e:
        cli.main(["released"])
    assert e.value.code == 3 and capsys.readouterr().err == ""
