"""Model files. Importing this package registers every model and its presets with mmkit.config."""
