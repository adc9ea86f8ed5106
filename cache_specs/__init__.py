"""The shipped cache specs (`--spec NAME`): one YAML file each, installed with sidetune."""
