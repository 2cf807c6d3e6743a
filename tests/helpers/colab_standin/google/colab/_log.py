"""One line per stand-in event, appended to COLAB_STANDIN_LOG (if set)."""

import json
import os
import time


def record(event: str, **details) -> None:
    path = os.environ.get("COLAB_STANDIN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.time(), "event": event, **details}) + "\n")
