"""The one settings object, read once: identity, data folder and sections (ingest, prefect, analysis,
sinks, archive, unattended, observability), from settings.yaml and the environment by flat names."""

from birdflow.settings.loading import SETTINGS_FILE_ENV, load_settings, settings_file_in_use
from birdflow.settings.model import Settings
from birdflow.settings.sections import SettingsError

__all__ = ["SETTINGS_FILE_ENV", "Settings", "SettingsError", "load_settings", "settings_file_in_use"]
