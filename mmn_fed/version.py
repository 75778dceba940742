"""The mmn-fed version: one place (the package exports it as ``mmn_fed.__version__``; a leaf, so ``mmn_fed.settings`` can
send it to sites without an import cycle). Keep it equal to pyproject.toml's ``version``."""
__version__ = "0.1.0"
