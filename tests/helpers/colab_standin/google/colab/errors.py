"""``google.colab.errors.Error``: the base of Colab's own errors (huggingface_hub catches it)."""


class Error(Exception):
    pass
