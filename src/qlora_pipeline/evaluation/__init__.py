"""Measuring a run: the report (report.json, report.md, the scorecard), GGUF scoring against F16,
GGUF-vs-transformers parity, the chat prompt routes, held-out answers, decode speed and the fp32
reference. Libraries the evaluate stage (``qlora_pipeline.evaluate``, kept thin) calls.
"""
