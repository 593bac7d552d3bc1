"""Training presets: each module's `get_config()` returns a full trainer config."""
