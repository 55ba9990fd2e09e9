"""The generated stage options: what the user passes overrides the config, and the help states each
option's default once."""
from __future__ import annotations

import re

import pytest

from pipelines.cli import build_parser, main
from pipelines.options import configs_from_args
from pipelines.stages import default_configs


def test_stage_options_override_only_what_is_given():
    args = build_parser().parse_args(["run", "scene", "--splat.iterations", "7", "--no-depth.previews"])
    configs, defaults = configs_from_args(args), default_configs()
    assert configs["splat"].iterations == 7 and configs["depth"].previews is False
    assert configs["sfm"] == defaults["sfm"] and configs["relations"] == defaults["relations"]


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    # one entry per option: from its "  --flag" line to the next
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:", 1)[1])
    stated = {entry.split()[0]: entry.count("(default:") for entry in entries if entry.strip()}
    assert stated["--splat.iterations"] == 1 and stated["--relations.start"] == 1
    assert max(stated.values()) == 1, {k: v for k, v in stated.items() if v > 1}
