"""QLoRA fine-tuning of Phi-3.5 on oasst1, merge, GGUF export and serving: the course pipeline.

Stages (one module each): ``data`` (prepare), ``train``, ``merge``, ``evaluate``; the CLI is
``qlora-pipeline`` (``cli``). Heavy libraries are imported inside the functions that need them.
"""

__version__ = "0.1.0"
