"""``google.colab.userdata``: the notebook's secrets (the key icon in Colab's left bar)."""

import json
import os

from google.colab._log import record
from google.colab.errors import Error


class SecretNotFoundError(Error):
    pass


class NotebookAccessError(Error):
    pass


def get(key: str) -> str:
    path = os.environ.get("COLAB_STANDIN_SECRETS")
    secrets = json.loads(open(path, encoding="utf-8").read()) if path and os.path.isfile(path) else {}
    record("userdata.get", key=key, found=key in secrets)
    if key not in secrets:
        raise SecretNotFoundError(f"Secret {key} does not exist.")
    return secrets[key]
