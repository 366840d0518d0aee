"""The blindhub peer: hub connection, key agreement, aiortc call, media and CLI."""
