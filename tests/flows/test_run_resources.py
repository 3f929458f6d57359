"""What a flow-running process builds once: a station whose species settings name no species of the model
stops when it loads the model, naming them, instead of never matching."""

from __future__ import annotations

import pytest

from birdflow.flows.run_resources import RunResources
from birdflow.settings import Settings, SettingsError


def test_a_species_setting_that_names_no_species_stops_the_model_loading_by_name(tmp_path):
    resources = RunResources(
        Settings(
            data_dir=tmp_path, exclude_species=("Spinus trist",), species_min_confidence={"Turdus migratorius": 0.5}
        )
    )
    with pytest.raises(SettingsError, match="'Spinus trist', no species of BirdNET_GLOBAL_6K_V2.4"):
        _ = resources.model
    assert RunResources(Settings(data_dir=tmp_path, exclude_species=("spinus tristis",))).model is not None
