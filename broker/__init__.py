"""token-broker: OAuth 2.0 client-credentials tokens, fetched once, served locally."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("token-broker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
