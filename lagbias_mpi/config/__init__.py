"""Configuration: the YAML loader and the frozen, validated dataclasses of every command."""
