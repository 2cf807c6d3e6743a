"""The journey's stand-in for ``google`` (only ``google.colab`` is provided)."""
