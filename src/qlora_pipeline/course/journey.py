"""The student's journey as one rehearsed story: Colab → three notebooks on three VMs → Hub → a Space that answers.

    python -m qlora_pipeline.course.journey runs/journey --twin-hub runs/twin-hub --preset phi35-colab-t4 \\
        --override train.max_steps=4 ...                                    # `make journey`

The one thing the student gives is a Hugging Face write token, stored as the Colab secret
``HF_TOKEN``. Everything else is played as Colab and the Hub would play it, on this machine:

- a stand-in ``google.colab`` (``tests/helpers/colab_standin``) whose ``drive.mount`` gives a
  shared "My Drive" folder and whose ``userdata.get("HF_TOKEN")`` gives the token, in kernels that
  look like Colab's to huggingface_hub;
- a stand-in for the Hub's far end (``hub_standin``), seeded with the twin of Phi-3.5 and the
  oasst1 sample under their Hub ids; every process talks to it through huggingface_hub's own
  client (``HF_ENDPOINT``), with an empty Hub cache per VM;
- notebooks 1 → 2 → 3, each in its own empty working directory and kernel (notebooks 1 and 2 with
  llama-cpp-python blocked: they must not need it), then notebook 3 again with Drive turned off,
  from what the Hub holds alone;
- the Space notebook 3 pushed, installed in a fresh virtual environment from its own
  ``requirements.txt`` (no torch, no project install), started with its ``MODEL_REPO`` variable,
  and asked one question through ``gradio_client``.

It prints the bytes left on Drive by kind (with a full-size estimate), the inputs the student
gave, each notebook's time and the Space's install and start times; ``OUT/journey.json`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qlora_pipeline.course.rehearsal import S29
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import LARGE_FILES_POINTER, NAMES
from qlora_pipeline.paths import write_json_atomic

STANDIN = Path("tests") / "helpers" / "colab_standin"  # in the checkout (--repo)
STUDENT = "student"
TOKEN = "hf_journey_student_write_token"  # the student's one input: the Colab secret HF_TOKEN

QUESTION = "What is the capital of France?"


# ---------------------------------------------------------------------------- the Hub's far end
def start_hub(out: Path) -> tuple[subprocess.Popen, str]:
    """The Hub stand-in in its own process; its URL once it listens."""
    port_file = out / "hub.port"
    port_file.unlink(missing_ok=True)
    log = open(out / "hub.log", "w")  # noqa: SIM115 (the server's whole life)
    command = [
        sys.executable,
        "-m",
        "qlora_pipeline.course.hub_standin",
        "--user",
        STUDENT,
        "--port-file",
        str(port_file),
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while not port_file.is_file():
        if proc.poll() is not None or time.time() > deadline:
            raise PipelineError(f"the Hub stand-in did not start; see {out / 'hub.log'}")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def _snapshot(cache: Path, kind: str, repo_id: str) -> Path:
    folder = cache / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    return folder / "snapshots" / (folder / "refs" / "main").read_text().strip()


def seed_hub(hub_url: str, twin_hub: Path) -> list[str]:
    """Put the twin's base model and the oasst1 sample on the stand-in under their Hub ids, as the
    real Hub holds Phi-3.5 and oasst1 (uploaded by huggingface_hub itself)."""
    from huggingface_hub import HfApi

    from qlora_pipeline.hub_twin import DATASET_ID, MODEL_ID

    api = HfApi(endpoint=hub_url, token="hf_seed")
    for kind, repo_id in (("model", MODEL_ID), ("dataset", DATASET_ID)):
        api.create_repo(repo_id, repo_type=kind, exist_ok=True)
        api.upload_folder(folder_path=str(_snapshot(twin_hub, kind, repo_id)), repo_id=repo_id, repo_type=kind)
    return [MODEL_ID, DATASET_ID]


def hub_state(hub_url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{hub_url}/_standin/state", timeout=10) as answer:
        return json.loads(answer.read())


# ---------------------------------------------------------------------------- one Colab VM
def vm_environment(out: Path, vm: Path, hub_url: str, drive: bool, block: str, repo: Path) -> dict:
    """A fresh VM's environment: its own disk (/content) and Hub cache, the Colab stand-in first on
    the path, the Hub stand-in as the endpoint, Drive mountable or not. No token in it: the
    student's token is only a Colab secret."""
    startup = vm / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / STANDIN / "ipython_startup.py", startup / "00-colab.py")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(repo / STANDIN), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        IPYTHONDIR=str(vm / "ipython"),
        HF_ENDPOINT=hub_url,
        HF_HOME=str(vm / "content" / ".cache" / "huggingface"),
        HF_HUB_DISABLE_TELEMETRY="1",
        QLORA_COLAB_CONTENT=str(vm / "content"),
        COLAB_STANDIN_SECRETS=str(out / "colab-secrets.json"),
        COLAB_STANDIN_LOG=str(out / "colab-events.jsonl"),
        COLAB_STANDIN_BLOCK=block,
    )
    if drive:
        env["COLAB_STANDIN_DRIVE"] = str(out / "drive")
    else:
        env.pop("COLAB_STANDIN_DRIVE", None)
    return env


def run_vm(out: Path, repo: Path, name: str, vm_name: str, env: dict, parameters: dict, timeout: int) -> float:
    """One notebook on a fresh VM (its own working directory and kernel); its seconds."""
    from qlora_pipeline.course.notebook import run_notebook

    vm = out / vm_name
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel papermill starts inherits this process's environment
    started = time.time()
    try:
        run_notebook(
            repo / name, out / "executed" / f"{vm_name}-{name}", parameters=parameters, cwd=vm, timeout=timeout
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return round(time.time() - started, 1)


def fresh_vm(out: Path, vm_name: str) -> Path:
    vm = out / vm_name
    shutil.rmtree(vm, ignore_errors=True)
    vm.mkdir(parents=True)
    return vm


# ---------------------------------------------------------------------------- what Drive holds
DRIVE_KINDS = {  # the first folder (or file) under RUN_DIR -> what it is (names from RunLayout)
    NAMES.data.name: "data splits",
    NAMES.checkpoints.name: "checkpoints",
    NAMES.prefer_checkpoints.name: "checkpoints",
    NAMES.adapter.name: "adapter",
    NAMES.adapter_dpo.name: "adapter",
    **dict.fromkeys(
        (NAMES.stages.name, NAMES.config.name, LARGE_FILES_POINTER, NAMES.merge_check.name, NAMES.time_estimate.name),
        "run records",
    ),
    **dict.fromkeys(
        (
            NAMES.report_json.name,
            NAMES.report_md.name,
            NAMES.scorecard_plot.name,
            NAMES.loss_plot.name,
            NAMES.preference_plot.name,
        ),
        "reports",
    ),
    NAMES.train_log.name: "logs",
    NAMES.prefer_log.name: "logs",
}


WEIGHT_FILES = (".safetensors", ".pt")  # LoRA weights and optimizer state: they grow with the LoRA


def drive_usage(drive: Path, lora_scale: float, data_scale: float) -> dict[str, list[int]]:
    """Bytes on the student's Drive by kind, each with its full-size estimate: LoRA weights and
    optimizer state grow with the LoRA's parameters, the data splits with oasst1's messages;
    tokenizer files, records, reports and logs stay as they are."""
    runs = {p.parent for p in drive.rglob(NAMES.config.name) if (p.parent / NAMES.stages.name).is_dir()}
    usage: dict[str, list[int]] = {}
    for path in sorted(drive.rglob("*")):
        if path.is_file() and not path.is_symlink():
            run = next((r for r in runs if path.is_relative_to(r)), None)
            kind = DRIVE_KINDS.get(path.relative_to(run).parts[0], "other") if run else "other"
            size = path.stat().st_size
            scale = lora_scale if path.name.endswith(WEIGHT_FILES) else data_scale if kind == "data splits" else 1
            measured, estimated = usage.setdefault(kind, [0, 0])
            usage[kind] = [measured + size, estimated + int(size * scale)]
    return dict(sorted(usage.items()))


def lora_parameters(config: dict, r: int) -> int:
    """LoRA parameters of rank r on Phi-3's four projections (qkv fused, o, gate_up fused, down),
    from a transformers ``config.json``: A is r x in, B is out x r."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = (config.get("num_key_value_heads") or heads) * (hidden // heads)
    shapes = [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)]
    return config["num_hidden_layers"] * r * sum(i + o for i, o in shapes)


# The real data set's size, from OpenAssistant/oasst1's dataset card (datasets' num_bytes of train +
# validation, all columns). The bundled sample's own num_bytes (the twin hub's prepared cache,
# the same features) gives the scale: by bytes, not messages, as the sample's messages are shorter.
OASST1_BYTES = 100_367_999 + 5_243_405


def scales(twin_hub: Path, parameters: dict) -> tuple[float, float]:
    """How much larger the LoRA and the data are at full size than in this rehearsal."""
    from qlora_pipeline.config import load_config
    from qlora_pipeline.hub_twin import MODEL_ID
    from qlora_pipeline.phi3_tokenizer import phi35_reference

    twin = json.loads((_snapshot(twin_hub, "model", MODEL_ID) / "config.json").read_text())
    r = load_config(parameters["PRESET"], parameters["OVERRIDES"]).lora.r
    lora = lora_parameters(phi35_reference()["config"], r) / lora_parameters(twin, r)
    return lora, oasst1_scale(twin_hub)


def oasst1_scale(twin_hub: Path) -> float:
    """How many times the real oasst1 is larger than the bundled sample, by datasets' num_bytes."""
    info = next((Path(twin_hub) / "datasets").rglob("dataset_info.json"))
    return OASST1_BYTES / sum(split["num_bytes"] for split in json.loads(info.read_text())["splits"].values())


# ---------------------------------------------------------------------------- the Space
def space_from_hub(out: Path, hub_url: str, space: str) -> tuple[Path, dict]:
    """The Space as the Hub holds it: its files and its variables."""
    from huggingface_hub import HfApi, snapshot_download

    folder = out / "space"
    shutil.rmtree(folder, ignore_errors=True)
    snapshot_download(space, repo_type="space", local_dir=str(folder), endpoint=hub_url, token=TOKEN)
    variables = {k: v.value for k, v in HfApi(endpoint=hub_url, token=TOKEN).get_space_variables(space).items()}
    return folder, variables


def space_settings(readme: Path) -> dict:
    """A Space's README front matter (sdk, sdk_version, python_version, app_file, ...)."""
    import yaml

    return yaml.safe_load(readme.read_text(encoding="utf-8").split("---")[1])


def install_space(out: Path, folder: Path) -> float:
    """A fresh virtual environment with what a Space installs: Gradio at the README's sdk_version,
    then the Space's requirements.txt. Nothing of this project, no torch."""
    venv = out / "space-venv"
    shutil.rmtree(venv, ignore_errors=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    # llama-cpp-python's own wheel index cannot be reached here: fail over to PyPI at once
    env = {**os.environ, "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}
    gradio = f"gradio=={space_settings(folder / 'README.md')['sdk_version']}"
    subprocess.run([*pip, gradio, "-r", str(folder / "requirements.txt")], check=True, env=env, cwd=folder)
    return round(time.time() - started, 1)


def ask_space(out: Path, folder: Path, hub_url: str, variables: dict) -> dict:
    """Start the Space's app.py as the Space would (its variables as the environment) and ask it one
    question through gradio_client; the start time and the answer."""
    from gradio_client import Client

    from qlora_pipeline.course.app_check import served

    python = str(out / "space-venv" / "bin" / "python")
    env = {
        **variables,
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(out / "space-home"),
        "HF_HUB_OFFLINE": "0",
    }
    started = time.time()
    command = [python, str(folder / "app.py"), "--port", "{port}"]  # a Space serves on 7860, its default
    with served(command, timeout=600, env=env, log=out / "space.log", cwd=folder) as url:
        start_seconds = round(time.time() - started, 1)
        client = Client(url, verbose=False)
        answer, status = client.predict(QUESTION, "", None, 0.0, 1.0, 1, 1.0, 32, api_name="/chat")
    return {"start_seconds": start_seconds, "question": QUESTION, "answer": answer, "status": status}


# ---------------------------------------------------------------------------- the story
def play(out: Path, repo: Path, twin_hub: Path, parameters: dict, timeout: int, log=print) -> dict:
    """The whole journey; what it measured (also written to OUT/journey.json as it goes)."""
    out = Path(out).resolve()
    for folder in ("drive", "executed"):  # a journey starts from a student's empty Drive
        shutil.rmtree(out / folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "colab-events.jsonl").unlink(missing_ok=True)
    write_json_atomic(out / "colab-secrets.json", {"HF_TOKEN": TOKEN})  # the student's one input
    hub, hub_url = start_hub(out)
    results: dict = {"inputs": {"the Colab secret HF_TOKEN": "a write token"}, "hub": hub_url, "notebooks": {}}
    try:
        log(f"journey: Hub stand-in at {hub_url}, seeded with {', '.join(seed_hub(hub_url, twin_hub))}")
        blocks = {S29[0]: "llama_cpp", S29[1]: "llama_cpp", S29[2]: ""}  # only notebook 3 loads a GGUF
        for i, name in enumerate(S29, start=1):
            vm = fresh_vm(out, f"vm-{i}")
            env = vm_environment(out, vm, hub_url, drive=True, block=blocks[name], repo=repo)
            results["notebooks"][f"{i}. {name}"] = seconds = run_vm(out, repo, name, vm.name, env, parameters, timeout)
            log(f"journey: notebook {i} ({name}) on vm-{i}: {seconds:.0f} s")
            write_json_atomic(out / "journey.json", results)
        results["drive_bytes"] = drive_usage(out / "drive", *scales(twin_hub, parameters))
        vm = fresh_vm(out, "vm-4")
        env = vm_environment(out, vm, hub_url, drive=False, block="", repo=repo)
        seconds = run_vm(out, repo, S29[2], vm.name, env, {**parameters, "USE_DRIVE": False}, timeout)
        results["notebooks"][f"3. {S29[2]} again, Drive off (the Hub alone)"] = seconds
        log(f"journey: notebook 3 again with Drive turned off, from the Hub alone: {seconds:.0f} s")
        results["hub_state"] = hub_state(hub_url)
        write_json_atomic(out / "journey.json", results)
        results["space"] = check_space(out, hub_url, results["hub_state"], log)
    finally:
        hub.terminate()
        hub.wait(timeout=20)
    results["colab_events"] = colab_events(out)
    write_json_atomic(out / "journey.json", results)
    return results


def check_space(out: Path, hub_url: str, state: dict, log=print) -> dict:
    spaces = [name.removeprefix("spaces/") for name in state if name.startswith("spaces/")]
    if len(spaces) != 1:
        raise PipelineError(f"notebook 3 should have pushed one Space; the Hub holds {spaces}")
    folder, variables = space_from_hub(out, hub_url, spaces[0])
    if not variables.get("MODEL_REPO"):
        raise PipelineError(f"the Space {spaces[0]} has no MODEL_REPO variable: it would stop at start")
    log(f"journey: installing the Space {spaces[0]} in a fresh virtual environment (llama-cpp-python compiles)")
    install = install_space(out, folder)
    log(f"journey: installed in {install:.0f} s; starting it with MODEL_REPO={variables['MODEL_REPO']}")
    answer = ask_space(out, folder, hub_url, variables)
    log(f"journey: the Space answered {answer['question']!r} with {answer['answer']!r} ({answer['status']})")
    return {"repo": spaces[0], "variables": variables, "install_seconds": install, **answer}


def colab_events(out: Path) -> list[dict]:
    path = out / "colab-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summary_lines(results: dict) -> list[str]:
    drive = results.get("drive_bytes", {})
    inputs = ", ".join(results["inputs"])
    lines = ["", "The journey, measured:", f"  inputs from the student: {inputs} (the token only)"]
    lines += [f"  {name}: {seconds:.0f} s" for name, seconds in results["notebooks"].items()]
    lines += ["  bytes on Drive at the end (this run → full-size estimate):"]
    lines += [f"    {kind:<12} {size / 1e6:9.2f} MB → {full / 1e6:9.1f} MB" for kind, (size, full) in drive.items()]
    total, total_full = (sum(v[i] for v in drive.values()) for i in (0, 1))
    lines += [f"    {'total':<12} {total / 1e6:9.2f} MB → {total_full / 1e6:9.1f} MB"]
    space = results.get("space")
    if space:
        lines += [
            f"  the Space {space['repo']}: installed in {space['install_seconds']:.0f} s, started in "
            f"{space['start_seconds']:.0f} s, answered {space['answer']!r}"
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the VMs, Drive, the Space and journey.json")
    parser.add_argument("--twin-hub", type=Path, required=True, help="the twin hub (qlora-pipeline hub-twin)")
    parser.add_argument("--preset", default="phi35-colab-t4")
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE for every notebook's OVERRIDES")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the checkout holding the notebooks")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    parameters = {"PRESET": args.preset, "OVERRIDES": args.override}
    try:
        results = play(args.out, args.repo.resolve(), args.twin_hub.resolve(), parameters, args.timeout)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
