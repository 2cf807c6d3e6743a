"""QLoRA fine-tuning of Phi-3.5 on oasst1, merge, GGUF export and serving: the course pipeline.

Stages (one module each): ``prepare``, ``train``, ``merge``, ``export``, ``evaluate``, run in order by
``pipeline``; the CLI is ``qlora-pipeline`` (``cli``). Around them: ``serve/``, ``gguf/``,
``evaluation/`` and ``course/`` (README.md's code map). Heavy libraries are imported inside the
functions that need them.
"""

__version__ = "0.1.0"
