"""The documentation and presets agree with the code: config keys, preset values."""

import re
import tomllib

import pytest
from conftest import APP_DIR, default_run_config

from flower_tutorial.config import RunSettings

PRESETS = sorted((APP_DIR / "conf").glob("*.toml"))


def _reference_keys() -> list[str]:
    """The keys of the run-config table in docs/configuration.md, in order."""
    page = (APP_DIR / "docs" / "configuration.md").read_text()
    section = page.split("## Run config\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE)


def test_the_config_reference_documents_exactly_pyprojects_keys():
    documented = _reference_keys()
    assert len(documented) == len(set(documented)), "a key is documented twice"
    assert set(documented) == set(default_run_config())


def test_the_reference_gives_pyprojects_defaults():
    page = (APP_DIR / "docs" / "configuration.md").read_text()
    for key, value in default_run_config().items():
        if isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, str):
            shown = f'"{value}"'
        else:
            shown = value
        assert f"| `{key}` | `{shown}` |" in page, key


def test_there_are_the_documented_presets():
    assert {p.name for p in PRESETS} == {
        "tutorial.toml",
        "dirichlet-0.3.toml",
        "dirichlet-0.3-every-organization.toml",
        "smoke.toml",
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_each_preset_is_a_valid_run_config(preset):
    overrides = tomllib.loads(preset.read_text())
    assert set(overrides) <= set(default_run_config()), "a key pyproject lacks"
    RunSettings.from_run_config(default_run_config() | overrides)


def test_the_tutorial_preset_is_pyprojects_defaults():
    overrides = tomllib.loads((APP_DIR / "conf" / "tutorial.toml").read_text())
    defaults = default_run_config()
    assert {key: defaults[key] for key in overrides} == overrides


def test_the_every_organization_preset_is_the_dirichlet_one_with_all_evaluating():
    def preset(name: str) -> dict:
        return tomllib.loads((APP_DIR / "conf" / name).read_text())

    every = preset("dirichlet-0.3-every-organization.toml")
    assert (every["fraction-evaluate"], every["min-evaluate-clients"]) == (1.0, 10)
    assert {k: v for k, v in every.items() if "evaluate" not in k} == {
        k: v for k, v in preset("dirichlet-0.3.toml").items() if "evaluate" not in k
    }
