"""The parallelism diagram (gptjax/sharding_diagram.py) is read from the model's logical axes and sharding.RULES,
and docs/parallelism.md shows the picture of today's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptjax import sharding_diagram
from gptjax.sharding import RULES

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "parallelism.md"


@pytest.fixture(scope="module")
def table():
    return sharding_diagram.rows()


def test_every_weight_dimension_is_split_as_the_rules_say(table):
    weights = [r for r in table if r["kind"] == "weight"]
    assert {r["tensor"].split(" ")[0] for r in weights} >= {"wte.embedding", "wpe", "h.N.attn.c_attn", "h.N.mlp.c_fc"}
    for row in weights:
        for axis, split in zip(row["axes"], row["mesh"]):
            rule = RULES.get(axis) if axis else None
            expected = "+".join((rule,) if isinstance(rule, str) else rule or ())
            assert split == expected, (row["tensor"], axis)


def test_activations_follow_the_batch_and_head_rules(table):
    by_name = {r["tensor"]: r["mesh"] for r in table if r["kind"] == "activation"}
    assert by_name == {"tokens [B, T]": ["data+fsdp", ""], "KV cache [B, H, S, K]": ["data+fsdp", "tensor", "", ""]}


def test_the_page_shows_the_picture_of_todays_table(table):
    name = f"parallelism-{sharding_diagram.data_hash(table)}.png"
    assert f"(img/{name})" in PAGE.read_text(encoding="utf-8"), (
        f"the sharding rules changed: run `python -m gptjax.sharding_diagram docs/img` and link img/{name}")
    assert (ROOT / "docs" / "img" / name).is_file()


def test_the_drawing_writes_a_png(table, tmp_path):
    path = sharding_diagram.plot(table, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
