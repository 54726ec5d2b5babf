"""The README's configuration reference is the one `livemb config` generates from the settings."""

from __future__ import annotations

from pathlib import Path

from livemb.core.settings import Settings
from livemb.tools.ops.config_doc import BEGIN, END, readme_block, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_has_a_description():
    missing = [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"settings without a description (core/settings.py): {missing}"


def test_readme_settings_table_is_current():
    text = README.read_text()
    assert BEGIN in text and END in text, "README lacks the generated settings table markers"
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == readme_block(), "README settings table is stale: paste the output of `livemb config`"


def test_table_lists_every_variable_once():
    rows = settings_table().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == [f"LIVEMB_{n.upper()}" for n in Settings.model_fields]
