"""The README's settings table names every setting, in both spellings, and nothing else."""

from __future__ import annotations

import dataclasses
import re

from streamcoord.settings import ENV_PREFIX, Settings

from .processes import REPO

ROW = re.compile(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \|", re.MULTILINE)


def test_the_settings_table_lists_every_setting_in_both_spellings() -> None:
    text = (REPO / "README.md").read_text()
    table = text[text.index("| `STREAMCOORD` key | environment variable |"):]
    table = table[: table.index("\n\n")]
    rows = ROW.findall(table)
    assert all(variable == ENV_PREFIX + key for key, variable in rows), rows
    documented = [key.lower() for key, _ in rows]
    assert sorted(documented) == sorted(f.name for f in dataclasses.fields(Settings)), (
        "README settings table and streamcoord.Settings differ"
    )
