"""The help of every command: every option says what it does and shows its default, no reST
markup leaks into the text, and both commands answer --version."""
import argparse

import pytest

from halforder import __version__
from halforder.cli import main, parser


def _parsers():
    """``halforder``, ``halforder demo`` and (with the diffusion extra) ``halforder train``."""
    top = parser()
    found = {"halforder": top}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update((f"halforder {name}", p) for name, p in action.choices.items())
    try:
        from halforder.diffusion.app.cli import parser as train_parser
    except ImportError:
        pass
    else:
        found["halforder train"] = train_parser()
    return found


def test_the_parsers_are_found():
    assert {"halforder", "halforder demo", "halforder train"} <= set(_parsers())


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_has_help_without_markup(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    p = _parsers()[name]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help and "`" not in choice.help, (name, choice.dest)
            continue
        assert action.help and action.help.strip(), (name, action.option_strings)
        assert "`" not in action.help, (name, action.option_strings, action.help)
    assert "`" not in p.format_help(), name
    if name == "halforder":
        return
    for a in p._actions:        # the help string as the parser's formatter shows it; --config has no default
        if a.option_strings and a.dest not in ("help", "version", "config") and a.option_strings[0][:4] != "--no":
            assert "(default: " in p.formatter_class(p.prog)._get_help_string(a), (name, a.dest)


def test_demo_help_describes_its_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag, default in (("--T", "8"), ("--d", "3"), ("--samples", "50000"), ("--seed", "0")):
        line, = [ln for ln in text.splitlines() if ln.strip().startswith(flag + " ")]
        assert f"(default: {default})" in line and len(line.split()) > 4, line


@pytest.mark.parametrize("argv", [["--version"], ["train", "--version"]])
def test_version(capsys, argv):
    if argv[0] == "train":
        pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"halforder {__version__}"


@pytest.mark.parametrize("command", ["train", "plan"])
def test_a_missing_diffusion_extra_is_one_line_and_exit_2(monkeypatch, capsys, command):
    """Without the diffusion extra, `halforder train` and `halforder plan` say how to install it
    (exit 2, one line), before anything imports the missing packages."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main([command, "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err == (f"halforder {command}: error: needs the diffusion extra (missing: transformers); install it with: "
                   'pip install -e ".[diffusion]"\n')


@pytest.mark.parametrize("command", ["train", "plan", "diagnose", "export", "demo"])
def test_every_command_prints_its_help(command, capsys):
    """``halforder COMMAND --help`` prints its usage and exits 0 (a help string with a bare
    ``%`` once made argparse fail here)."""
    pytest.importorskip("diffusers")
    with pytest.raises(SystemExit) as e:
        code = main([command, "--help"])
        raise SystemExit(code)
    assert e.value.code in (0, None) and "usage:" in capsys.readouterr().out
