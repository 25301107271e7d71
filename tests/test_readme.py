"""The README says what the code does: its options table is `fuser.Options`, and torch combines mode= and
options= the way it says."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import fuser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_options_table_lists_every_option_with_its_default():
    table = README[README.index("| option | default | meaning |"):]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|", table.split("\n\n")[0], flags=re.M)
    expected = [(f.name, "all" if f.default is None else f"`{f.default!r}`".replace("'", '"'))
                for f in dataclasses.fields(fuser.Options)]
    assert rows == expected


def test_torch_compile_takes_mode_or_options_never_both():
    for options in ({"verify": True}, {}):
        with pytest.raises(RuntimeError, match=re.escape(
                "Either mode or options can be specified, but both can't be specified at the same time.")):
            torch.compile(torch.sin, backend="fuser", mode="reduce-overhead", options=options)
    seen = []

    def spy(gm, example_inputs, **kwargs):
        seen.append(kwargs)
        return gm.forward

    for given in ({"mode": "reduce-overhead"}, {"options": {"codegen": "eager"}}):
        torch._dynamo.reset()
        torch.compile(lambda x: x.sin(), backend=spy, **given)(torch.randn(3))
    assert seen == [{"mode": "reduce-overhead"}, {"options": {"codegen": "eager"}}]
