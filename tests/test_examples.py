"""Every example under examples/ runs in --smoke mode: it trains (or traces) a few steps with
chainrule and with torch, prints its summary and, where it draws one, saves its plot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# example -> (extra arguments, words its summary must print, whether it saves a plot)
CASES = {
    "mnist_mlp": (["--data-dir", "{tmp}/data"], ["test accuracy", "chainrule", "torch",
                                                 "chainrule's test accuracy"], True),
    "finetune_bert": ([], ["test accuracy", "chainrule", "torch", "chance",
                           "chainrule's test accuracy"], True),
    "tiny_gpt": ([], ["validation loss", "chainrule", "torch", "chainrule's validation loss",
                      "from the character before it", "sample from chainrule's model"], True),
    "autograd_graph": ([], ["AddmmBackward0", "TBackward0", "GeluBackward0", "AccumulateGrad",
                            "LinearFunctionBackward", "saved for backward", "new memory",
                            "passes over memory", "side by side",
                            "what accumulate_grad changes", "linear_backward_accumulate"],
                       False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_smoke(name, tmp_path):
    extra, words, plots = CASES[name]
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if plots:
        args += ["--out", str(tmp_path / "results")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for word in words:
        assert word in result.stdout, f"{name}: summary lacks {word!r}:\n{result.stdout[-3000:]}"
    if plots:
        assert list((tmp_path / "results").glob("*.png")), f"{name} saved no plot"
