"""docs/recipe.md's schedule table is what our schedule code gives for the shipped configs."""

from __future__ import annotations

from benchmarks.recipe_table import DOC, END, START, markdown_table


def test_recipe_table_in_the_docs_matches_the_schedule_code():
    text = DOC.read_text()
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == markdown_table(), "docs/recipe.md is stale: run benchmarks/recipe_table.py --write"
    assert "| gram (200,000 its) | Gram weight | 0 | 0 @ 0 | 2 |" in table  # 2.0 from iteration 1,000 on
