"""The interception experiment and its attacker, kept apart from the product.

The hostile hub (`hostile_hub`), its media man in the middle and tampering (`media_mitm`), the
experiment runner (`runner`), its signal analysis (`analysis`), its figure (`figure`) and the
``blindhub demo`` command (`command`). This package may import the product; no product module
imports it (the import contracts in pyproject.toml, checked by ``lint-imports`` in ``make lint``).
"""
