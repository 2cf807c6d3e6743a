"""IPython start-up for the journey's notebook kernels: the kernel looks like Colab's.

Colab's kernel has ``google.colab`` imported and runs under ``google.colab._shell.Shell``, which is
how huggingface_hub tells it is on Colab (``"google.colab" in str(get_ipython())``) before it reads
the secret HF_TOKEN through ``google.colab.userdata``. ``COLAB_STANDIN_BLOCK`` names modules the
notebook must not need (notebooks 1 and 2 never load llama-cpp-python): importing them fails.
"""

import os
import sys

import google.colab  # noqa: F401  (the stand-in package, first on the kernel's path)

_shell = get_ipython()  # noqa: F821  (defined in IPython's start-up namespace)
if _shell is not None:
    _shell.__class__ = type("Shell", (type(_shell),), {"__module__": "google.colab._shell"})
for _name in filter(None, os.environ.get("COLAB_STANDIN_BLOCK", "").split(",")):
    sys.modules[_name] = None
