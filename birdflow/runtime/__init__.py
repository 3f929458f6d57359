"""What every birdflow process runs with, above the core and the settings: metrics, the folder watch, retention."""
