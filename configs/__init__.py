"""ml-collections config files, one `get_config()` each."""
