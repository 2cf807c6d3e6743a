"""The Hugging Face Hub in the course: the token, the repo names, pushing and pulling run parts, the Space.

    from qlora_pipeline.hub import course_repos
    from qlora_pipeline.publish import push_run_part
    repos = course_repos(RUN_DIR)             # names from your token's user and the run's name
    push_run_part(RUN_DIR, "adapter", repos)  # notebook 1; notebook 3 ends with push_space

The token is found by huggingface_hub's own lookup (``get_token``: ``HF_TOKEN`` in the
environment, Colab's secret ``HF_TOKEN``, then the login cache), never printed and never written
to a run folder. A push that was asked for but cannot happen stops with one line.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import RunLayout

TOKEN_HELP = (
    "create a write token at huggingface.co/settings/tokens and add it as the Colab secret HF_TOKEN "
    "(the key icon in the left bar, with notebook access on; then Runtime -> Restart session, as huggingface_hub "
    "reads Colab's secrets once), or set HF_TOKEN, or run `hf auth login`"
)


def hub_token(required_for: str | None = None) -> str | None:
    """The Hub token huggingface_hub would use, or None; with ``required_for`` a missing token is
    a one-line error naming what needed it."""
    from huggingface_hub import get_token

    token = get_token()
    if not token and required_for:
        raise PipelineError(f"{required_for} needs a Hugging Face token: {TOKEN_HELP}")
    return token or None


def hub_url(repo_id: str, repo_type: str = "model") -> str:
    """The page of a repo on the Hub the client talks to (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"


# ---------------------------------------------------------------------------- the course's repos
# The student gives one thing: a token. The user name comes from it (whoami), and every repo's
# name from the run's name, so the three notebooks agree without being told.
REPO_KINDS = ("adapter", "merged", "gguf", "space")


@dataclass(frozen=True)
class CourseRepos:
    """Where the notebooks push and pull, and whether they push."""

    adapter: str | None
    merged: str | None
    gguf: str | None
    space: str | None
    push: bool  # a token was found (or PUSH_TO_HUB = True) and PUSH_TO_HUB is not False
    private: bool  # PRIVATE = True: private repos, the Space gets the token as a secret


def repo_name(user: str, run_dir: Path, kind: str) -> str:
    """``user/phi35-oasst1-<run name>-<kind>``: the default name of one of the course's repos."""
    run = Path(run_dir).name or "run"
    return f"{user}/phi35-oasst1-{run}-{kind}"


def course_repos(
    run_dir: Path,
    push: bool | None = None,
    private: bool = False,
    user: str | None = None,
    log=print,
    **given: str | None,
) -> CourseRepos:
    """The notebooks' Hub settings: ``push`` None pushes when a token is found, True requires one;
    ``given`` (``adapter=``, ``merged=``, ``gguf=``, ``space=``) overrides a derived name."""
    unknown = set(given) - set(REPO_KINDS)
    if unknown:
        raise PipelineError(f"unknown repo kind {sorted(unknown)[0]!r}; use one of {', '.join(REPO_KINDS)}")
    token = hub_token("PUSH_TO_HUB = True" if push else None)
    if token and (user is None or push is not False):  # about to push: check the token now
        user = _token_user(token, user)
    names = {k: given.get(k) or (repo_name(user, run_dir, k) if user else None) for k in REPO_KINDS}
    repos = CourseRepos(**names, push=bool(token) and push is not False, private=bool(private))
    if repos.push:
        log(f"Hub: pushing as {user} ({'private' if private else 'public'} repos: {repos.adapter}, …)")
    elif push is False:
        log("Hub: not pushing (PUSH_TO_HUB = False)")
    else:
        log(f"Hub: no token found, so nothing is pushed; to publish, {TOKEN_HELP}")
    return repos


def _token_user(token: str, user: str | None) -> str:
    """Who the token belongs to; a read-only token is refused now, not after an hour of training."""
    from huggingface_hub import HfApi

    try:
        me = HfApi(token=token).whoami()
    except Exception as exc:  # offline, revoked token: huggingface_hub raises several types
        raise PipelineError(
            f"could not ask the Hub whose token this is ({type(exc).__name__}); check the token, or set "
            "HF_USER and PUSH_TO_HUB = False to work without the Hub"
        ) from None
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise PipelineError(f"the Hugging Face token is read-only, and pushing needs write access: {TOKEN_HELP}")
    return user or me["name"]


# ---------------------------------------------------------------------------- run parts between notebooks
# Each Colab notebook runs on its own VM. Google Drive keeps the small parts of the run (data,
# checkpoints, adapter, records); the Hub carries the large ones (the merged model, the GGUFs)
# from one VM to the next. The run's config.json travels with each, so the next notebook knows the
# base, the data and the template that the files belong to.
RUN_CONFIG_IN_REPO = "qlora_run_config.json"
PART_MARKERS = {"adapter": "adapter_config.json", "merged": "config.json"}
PART_PARAMETERS = {"adapter": "ADAPTER_REPO", "merged": "MERGED_REPO"}  # the notebooks' names for them
MODEL_CARD = "README.md"  # the repo's card (qlora-pipeline push), not a file of the part
DPO_SUBFOLDER = "dpo"  # in the adapter repo: the preference-tuned adapter (RUN/adapter-dpo)


def push_space(folder: Path, space: str, model_repo: str | None = None, private: bool = False) -> str:
    """Create or update a Gradio Space from ``folder``; set its ``MODEL_REPO`` variable (and, for a
    private model repo, the token as its ``HF_TOKEN`` secret, so the Space can read the files)."""
    from huggingface_hub import HfApi

    token = hub_token("pushing the Space")
    api = HfApi(token=token)
    api.create_repo(space, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    # settings first: the upload starts the Space's build, which must find them
    if model_repo:
        api.add_space_variable(space, "MODEL_REPO", model_repo)
    if private:
        api.add_space_secret(space, "HF_TOKEN", token)
    api.upload_folder(
        folder_path=str(folder), repo_id=space, repo_type="space", commit_message="Upload from qlora-pipeline"
    )
    return hub_url(space, "space")


def pull_run_part(run_dir: Path, part: str, repo_id: str | None, cache_dir: str | None = None, log=print) -> bool:
    """Fetch RUN_DIR/part (with the run's config.json and, for the merged model, its merge check,
    where RUN_DIR has none) from ``repo_id`` when RUN_DIR lacks it; False when it was already there."""
    from qlora_pipeline.paths import atomic_dir

    layout = RunLayout(run_dir)
    folder = getattr(layout, part)
    if (folder / PART_MARKERS[part]).is_file():
        return False
    if not repo_id:
        raise PipelineError(
            f"{folder} is missing: run the previous notebook with this RUN_DIR (on Colab: the same "
            f"Google Drive), or set {PART_PARAMETERS[part]} to the Hub repo it pushed the {part} to"
        )
    snapshot = _download(repo_id, part, cache_dir)
    if not (snapshot / PART_MARKERS[part]).is_file():
        raise PipelineError(
            f"the Hub repo {repo_id!r} has no {PART_MARKERS[part]}: it does not hold a {part}; "
            f"check {PART_PARAMETERS[part]}"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    extras = {RUN_CONFIG_IN_REPO: layout.config, layout.merge_check.name: layout.merge_check}
    # the adapter repo's dpo/ is the preference-tuned adapter: RUN/adapter-dpo, beside RUN/adapter
    subfolders = {DPO_SUBFOLDER: layout.adapter_dpo} if part == "adapter" else {}
    for name, dest in subfolders.items():
        if (snapshot / name / PART_MARKERS[part]).is_file() and not (dest / PART_MARKERS[part]).is_file():
            with atomic_dir(dest) as tmp:
                _place_tree(snapshot / name, tmp, skip=())
    with atomic_dir(folder) as tmp:
        _place_tree(snapshot, tmp, skip=(*extras, MODEL_CARD), skip_dirs=tuple(subfolders))
        if not (tmp / PART_MARKERS[part]).is_file():  # never leave an empty part behind a "pulled"
            raise PipelineError(f"pulling {repo_id!r} gave no {PART_MARKERS[part]}; nothing was written to {folder}")
    _restore_extras(snapshot, extras)
    log(f"pulled the {part} from {hub_url(repo_id)} into {folder}")
    return True


def _place_tree(snapshot: Path, dest: Path, skip: tuple[str, ...], skip_dirs: tuple[str, ...] = ()) -> None:
    """The snapshot's files under ``dest`` (but files named in ``skip`` and folders in ``skip_dirs``)."""
    for file in snapshot.rglob("*"):
        inside = file.relative_to(snapshot)
        # (the Hub cache itself may sit under a .cache folder: only the snapshot's own parts count)
        if not file.is_file() or file.name in skip or ".cache" in inside.parts or inside.parts[0] in skip_dirs:
            continue
        (dest / inside).parent.mkdir(parents=True, exist_ok=True)
        _place(file, dest / inside)


def _place(cached: Path, dest: Path) -> None:
    """A real file at ``dest`` (the cache's symlinks would dangle on Drive): a hard link to the
    cached blob where both are on one disk (a 7.6 GB merged model is not stored twice on the VM),
    else a copy."""
    try:
        os.link(cached.resolve(), dest)
    except OSError:  # another file system (Drive), or one without hard links
        shutil.copyfile(cached, dest)


def _download(repo_id: str, part: str, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, token=hub_token()))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise PipelineError(
            f"could not download {repo_id!r} from the Hub ({str(exc).splitlines()[0][:160]}); "
            f"check {PART_PARAMETERS[part]} and, for a private repo, the token"
        ) from None


def _restore_extras(snapshot: Path, extras: dict[str, Path]) -> None:
    """The run's files that travel beside a part (its config, the merge check), where the run lacks them."""
    from qlora_pipeline.paths import write_text_atomic

    for name, dest in extras.items():
        if (snapshot / name).is_file() and not dest.is_file():
            write_text_atomic(dest, (snapshot / name).read_text(encoding="utf-8"))
