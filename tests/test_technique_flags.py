"""--cooldown_mix, --replay_weighting, --wise_ft: off by default, refused in one line where they cannot work.

daemon.training.technique_flags.
"""

from __future__ import annotations

import pytest

from daemon.exceptions import ConfigError


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"cooldown_mix": "balanced"}, "--cooldown_mix balanced .* needs --cooldown_fraction > 0"),
        ({"replay_weighting": "forgetting", "replay_fraction": 0}, "needs --replay_fraction > 0"),
        ({"wise_ft": True}, "--wise_ft .* needs a line started from --model_name_or_path"),
    ],
)
def test_options_that_cannot_work_are_refused_in_one_line(tree, flags, message):
    from daemon.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(["--dataset", "x.jsonl", *tree.flags(**flags)])


def test_every_option_is_off_by_default(tree):
    from daemon.training.arguments import parse_args

    techniques = parse_args(["--dataset", "x.jsonl", *tree.flags()]).techniques
    assert (techniques.cooldown_mix, techniques.replay_weighting, techniques.wise_ft) == ("file", "even", False)
