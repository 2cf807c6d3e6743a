"""The Hugging Face Space: the course's chat app on a fine-tuned Phi-3.5 GGUF.

Configured by the Space's variables (Settings -> Variables and secrets):
  MODEL_REPO    a Hub model repo holding GGUF files (notebook 3 sets it), e.g. you/phi35-oasst1-s29-gguf
  MODEL_FILE    which file(s), comma-separated (default: the models its gguf_models.json lists that fit
                this machine's memory; Q4_K_M first)
  HF_TOKEN      a secret, only for a private MODEL_REPO
  MODEL_PATH    or a .gguf file inside the Space itself
  N_GPU_LAYERS  -1 offloads every layer on a GPU Space (needs a CUDA build of llama-cpp-python)
  N_CTX         context length (default 2048)
  APP_AUTH      user:password to require a login (a secret, not a variable)
  BACKEND=openai with OPENAI_BASE_URL to front a model served elsewhere

Locally: `python app/app.py --model runs/demo/gguf/model-Q4_K_M.gguf` (or `make app`).
"""

import argparse
import sys

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.serve.chat_app import add_app_arguments, app_main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the course's Gradio chat app")
    add_app_arguments(parser)
    try:
        sys.exit(app_main(parser.parse_args()))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
