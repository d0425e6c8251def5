"""zimage-tornado: an OpenAI-compatible, non-blocking gateway for the Z-Image service."""

__version__ = "0.1.0"
SERVICE_NAME = "zimage-tornado"
