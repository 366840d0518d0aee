"""The blindhub signalling hub: a websocket relay of opaque payloads between peers."""
