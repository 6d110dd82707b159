"""The package version, reported by agents in Hello and by `llm-loadtest --version`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-loadtest")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"
