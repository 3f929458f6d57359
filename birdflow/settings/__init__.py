"""The one settings object, read once: identity, data folder and sections (ingest, prefect, analysis,
sinks, archive, unattended, observability), from settings.yaml and the environment by flat names."""

from birdflow.settings.loading import SETTINGS_FILE_ENV, load_settings, read_env_file
from birdflow.settings.model import SECTION_OF, SECTIONS, Settings
from birdflow.settings.sections import LISTENER_ID_PATTERN, SettingsError, validate_listener_id

__all__ = [
    "LISTENER_ID_PATTERN",
    "SECTIONS",
    "SECTION_OF",
    "SETTINGS_FILE_ENV",
    "Settings",
    "SettingsError",
    "load_settings",
    "read_env_file",
    "validate_listener_id",
]
