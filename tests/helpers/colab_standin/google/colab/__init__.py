"""A stand-in for Colab's ``google.colab`` (``make journey``, tests): ``drive`` and ``userdata``.

Colab's kernel imports ``google.colab`` at start, and huggingface_hub reads the secret ``HF_TOKEN``
through ``google.colab.userdata`` when it runs under Colab's shell. The journey puts this package
first on the kernel's path; the stand-in files it reads are named by environment variables:
``COLAB_STANDIN_DRIVE`` (the folder that plays the student's My Drive; unset: Drive cannot be
mounted), ``COLAB_STANDIN_SECRETS`` (a JSON file of the notebook's secrets) and
``COLAB_STANDIN_LOG`` (where each mount, flush and secret read is appended, for the journey to show).
"""

from google.colab import drive, errors, userdata  # noqa: F401
