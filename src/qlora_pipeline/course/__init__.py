"""Teaching and rehearsal code: the notebooks' helpers (views, concepts, Colab's set-up, time
estimates), the rehearsal and the journey with their stand-ins for Colab's far ends and the Hub's,
and the app's browser check. Nothing in the pipeline imports it (a contract in pyproject.toml).
"""
