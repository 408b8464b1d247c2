"""The ``mac-attention`` command line: options, help, one-line errors (exit status 2), no tracebacks.

None of these needs the model: where a check must come before the slow model load, the
load is replaced by one that fails the test if it is reached.
"""

import argparse
import warnings

import pytest
import torch

from mac_core import PRESETS
from mac_llm import cli, demo


@pytest.fixture
def no_model_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(demo, "load_model", load_model)


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("directory", "is not a file")])
def test_prompt_file_is_checked_before_the_model_loads(tmp_path, capsys, no_model_load, kind, message):
    path = tmp_path / "missing.txt" if kind == "missing" else tmp_path
    assert cli.main(["demo", "--prompt-file", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--prompt-file: {path} {message}" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["synthetic", "--reuse", "2"], "--reuse must lie in [0, 1], got 2"),
        (["synthetic", "--q-heads", "3", "--kv-heads", "2"], "--q-heads (3) must be a multiple of --kv-heads (2)"),
        (["synthetic", "--head-dim", "7"], "--head-dim must be even"),
        (["synthetic", "--tau", "nan"], "MACConfig.tau must be a finite number"),
    ],
)
def test_synthetic_errors_are_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mac-attention: error: ") and message in err


def _actions(parser: argparse.ArgumentParser):
    yield parser, [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def test_help_shows_every_default_and_every_option_has_help():
    for parser, actions in _actions(cli.build_parser()):
        text = parser.format_help()
        for action in actions:
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"
            if action.default not in (None, argparse.SUPPRESS, False):
                assert f"(default: {action.default})" in " ".join(text.split()), f"{parser.prog} {action.option_strings[0]}: default not shown"


def test_the_rule_and_its_parameters_are_options():
    from mac_core import MassRule, PaperRule
    from mac_llm.options import config_from

    parser = cli.build_parser()
    config = config_from(parser.parse_args(["synthetic", "--rule", "mass", "--tau", "0.3", "--tau-m", "0.7", "--per-group"]))
    assert config.rule == MassRule(tau_m=0.7, per_group=True) and config.tau == 0.3
    assert config_from(parser.parse_args(["synthetic", "--no-per-group"])).rule == PaperRule()
    with pytest.raises(SystemExit):
        cli.main(["synthetic", "--rule", "mass", "--tau-m", "nan"])


def test_defaults_come_from_the_presets():
    args = cli.build_parser().parse_args(["demo"])
    demo_preset = PRESETS["demo"]
    assert (args.tau, args.window, args.band, args.sinks, args.max_chain, args.rule) == (
        demo_preset.tau, demo_preset.window, demo_preset.band, demo_preset.sinks, demo_preset.max_chain, demo_preset.rule.name
    )
    args = cli.build_parser().parse_args(["synthetic"])
    assert (args.window, args.band, args.tau) == (PRESETS["synthetic"].window, PRESETS["synthetic"].band, PRESETS["synthetic"].tau)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("mac-attention ")


def test_triton_on_the_cpu_says_interpreter_and_keeps_numpy_quiet(capsys):
    """``--backend triton`` on a CPU: a note that the kernels run in the interpreter, and the
    interpreter's numpy warnings on −inf arithmetic do not reach the terminal."""
    import mac_triton
    from mac_core import Summary

    empty = Summary(torch.zeros(2, 3, 8), torch.full((2, 3), float("-inf")))  # ⊕ of empties: −inf arithmetic
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # without the suite's own filters: what a terminal would show
        warnings.simplefilter("always")
        step_fn = demo.step_function("triton", torch.device("cpu"))
        mac_triton.merge(empty, empty)
    assert "Triton interpreter" in capsys.readouterr().out
    assert step_fn is mac_triton.decode_step
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("calibration", ["keynorm", "qnorm"])
def test_synthetic_calibrates_on_the_prefill(capsys, calibration):
    """A calibration is applied to the prompt before decoding (it used to end in a traceback)."""
    argv = ["synthetic", "--calibration", calibration, "--prefill", "48", "--steps", "3", "--window", "16", "--band", "8", "--head-dim", "16"]
    assert cli.main(argv) == 0
    assert f"calibration {calibration}" in capsys.readouterr().out


def test_tau_m_needs_the_mass_rule_and_lies_in_the_unit_interval(capsys):
    assert cli.main(["synthetic", "--rule", "paper", "--tau-m", "0.5"]) == 2
    assert "--tau-m is the mass rule's threshold: it needs --rule mass" in capsys.readouterr().err
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["synthetic", "--rule", "mass", "--tau-m", bad])
    assert "expected a number in [0, 1]" in capsys.readouterr().err


class _Metadata:
    """What the demo reads of a GGUF file before its weights: the path and the config."""

    def __init__(self, path=None):
        from pathlib import Path

        from mac_llm.llama import ModelConfig

        self.path = Path(path or "SmolLM2-135M-Instruct.Q4_1.gguf")
        self.config = ModelConfig(30, 576, 9, 3, 1536, 49152, 8192, 100000.0, 1e-5)


def test_too_many_prompt_tokens_are_refused_before_the_weights_load(monkeypatch, capsys, no_model_load):
    monkeypatch.setattr(demo, "GGUFFile", _Metadata)
    assert cli.main(["demo", "--prompt-tokens", "9000", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens 9000 plus 64 new tokens exceed the model's context of 8192 tokens" in err


def test_a_model_path_that_is_not_a_gguf_file_is_a_one_line_error(tmp_path, capsys, no_model_load):
    missing, junk = tmp_path / "missing.gguf", tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    assert cli.main(["demo", "--model", str(missing), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model: model path {missing}: no such file" in err
    assert cli.main(["demo", "--model", str(junk), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable GGUF file" in err


def test_demo_lossless_options_are_checked_before_the_model_loads(capsys):
    assert cli.main(["demo", "--lossless", "--k-max", "300", "--window", "256", "--device", "cpu"]) == 2
    assert "--k-max 300 must be below --window 256" in capsys.readouterr().err
    assert cli.main(["demo", "--lossless", "--calibration", "keynorm", "--device", "cpu"]) == 2
    assert "drop --calibration" in capsys.readouterr().err
