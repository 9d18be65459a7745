"""MLflow tracking for every stage: one parent run per pipeline configuration, one child run per stage.

A stage wraps its work in a `StageTracker`:

    with StageTracker(params, stage="source", project_dir=root, enabled=rank == 0) as tracker:
        tracker.log_metrics({"loss": 0.42}, step=100)
        tracker.log_artifact("metrics/source.json")

Stages of one `dvc repro` are separate processes, so the parent run is found again by a tag:
`segshift.pipeline_key`, a hash of the git commit and the full resolved params. Every stage of the
same configuration at the same commit therefore lands under one parent; a changed param or commit
opens a new one. `SEGSHIFT_PARENT_RUN_ID` overrides the lookup (e.g. a sweep stage passes its own
run id to its trials, see `StageTracker.child_env`); such a parent belongs to whoever set it, so its
status is left alone.

Only rank 0 logs: with `enabled=False` no run is created and every method is a no-op.

Secrets never leave the machine: whatever this module sends to MLflow (params, tags, run names,
the config copy, dict/text/file artifacts, the error tag) or writes to its log goes through
`mask_text` / `mask_secrets`, which mask by key name and by value (see `mask_text`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import quote, quote_plus

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)
from pydantic import BaseModel

from segshift.components.config import Params, TrackingConfig

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "SEGSHIFT_PARENT_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CONFIG_ARTIFACT = "config/params.yaml"

TAG_STAGE = "segshift.stage"
TAG_ROLE = "segshift.role"  # "pipeline" (parent) or "stage" (child)
TAG_PIPELINE_KEY = "segshift.pipeline_key"
TAG_ERROR = "segshift.error"
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_DVC_STAGE = "dvc.stage"
TAG_DVC_STAGE_HASH = "dvc.stage_hash"
TAG_PARENT = "mlflow.parentRunId"

MASK = "***"
# A key path containing any of these names a credential; its value is never logged. ("auth" but
# not "author": an author's name is no secret, and GIT_AUTHOR_NAME is no credential variable.)
_SECRET_KEY = re.compile(r"secret|passw|token|access_?key|credential|api_?key|private_?key"
                         r"|auth(?!or)", re.IGNORECASE)

# Masking by key name misses a credential pasted into an innocent-looking value, so every text
# sent to MLflow or to the log is also masked by what it looks like (see `mask_text`).

# Characters that end a URL inside prose, YAML, JSON or HTML.
_URL_END = r"\s\"'<>"
# user:password@ in a URL: from :// to the LAST @ before the host, because the password may
# itself hold "@" or "/" (an AWS secret key pasted into an S3 endpoint URL does). It never
# reaches into the next URL of the same text. A path holding "@" after a ":port/" is masked too:
# hiding a path is cheaper than guessing wrong about a password.
_URL_USERINFO = re.compile(rf"(?<=://)(?:(?!://)[^{_URL_END}])*?@"
                           rf"(?=[^{_URL_END}/?#@]*(?:[{_URL_END}/?#]|$))")
# name=value in a query string or fragment (presigned S3/GCS/Azure URLs, OAuth redirects).
_QUERY_PARAM = re.compile(rf"(?<=[?&;#])(?P<name>[^=&#;?{_URL_END}]+)=(?P<value>[^&#{_URL_END}]*)")
# Query names that carry a signature or a credential beyond `_SECRET_KEY`'s: X-Amz-Signature,
# sig (Azure SAS), Key-Pair-Id, session ids, OAuth codes. X-Amz-SignedHeaders only lists names.
_SECRET_QUERY_NAME = re.compile(r"sig(?!nedheaders)|key|session|code|jwt|bearer", re.IGNORECASE)
# An AWS access key id (long-term AKIA, temporary ASIA).
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")
# An AWS secret access key: exactly 40 characters of base64 ([A-Za-z0-9/+]) standing alone.
# `_looks_random` then spares the 40-hex git SHAs and plain words this shape also fits.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")
# Credential variables shorter than this are not looked for in values: "testing" or "minio"
# would mask every occurrence of a common word.
MIN_ENV_SECRET_LENGTH = 8
# Variables whose names look secret but hold a path to one (SSH_AUTH_SOCK, *_CREDENTIALS_FILE).
_ENV_NOT_SECRET = re.compile(r"_(?:FILE|PATH|DIR|SOCK)$", re.IGNORECASE)
_INVALID_KEY_CHARS = re.compile(r"[^\w\-./ :]")


class StageTerminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so the run ends KILLED like on Ctrl-C.

    A KeyboardInterrupt subclass on purpose: `except Exception` in stage code cannot swallow it.
    """


# --------------------------------------------------------------------------- where to log

def resolve_tracking_uri(cfg: TrackingConfig, project_dir: str | Path) -> str:
    """`cfg.uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<project_dir>/mlflow.db`.

    A relative sqlite path is made absolute against `project_dir`: Ray and Tune change the working
    directory, and a relative database would silently split the history.
    """
    project_dir = Path(project_dir).resolve()
    uri = cfg.uri or os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{project_dir / DB_NAME}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{project_dir / db}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path else None


def default_artifact_location(uri: str) -> str | None:
    """`<db dir>/mlartifacts` for a sqlite store; None lets the store (e.g. a server) decide."""
    db = sqlite_path(uri)
    if db is None or not db.is_absolute():
        return None
    return (db.parent / ARTIFACTS_DIR).as_uri()


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with artifacts beside a sqlite db) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(uri))
        except MlflowException:
            # Another stage or trial created it in the meantime.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(
            f"MLflow experiment '{name}' (id {experiment.experiment_id}) is deleted in "
            f"{mask_text(uri)}; "
            f"restore it (`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
            "or set another tracking.experiment")
    return experiment.experiment_id


# --------------------------------------------------------------------------- what to log

def params_tree(params: Params | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved configuration as plain JSON-like data (tuples become lists)."""
    if isinstance(params, BaseModel):
        return params.model_dump(mode="json")
    return json.loads(json.dumps(dict(params), default=str))


def is_secret_key(key_path: str) -> bool:
    return bool(_SECRET_KEY.search(key_path))


def mask_text(text: str) -> str:
    """`text` with every credential it holds replaced by the mask, whatever key it came under:
    the values of credential environment variables (as they are now), URL user-info, secret
    query parameters, AWS access key ids and secret access keys."""
    for secret in _env_secrets():
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(f"{MASK}@", text)
    text = _QUERY_PARAM.sub(_mask_query_param, text)
    text = _AWS_KEY_ID.sub(MASK, text)
    return _AWS_SECRET.sub(_mask_aws_secret, text)


def _env_secrets() -> list[str]:
    """Values of the credential variables set now, also URL-encoded, longest first (so that a
    secret holding another is masked whole)."""
    secrets: set[str] = set()
    for name, value in os.environ.items():
        if (len(value) >= MIN_ENV_SECRET_LENGTH and is_secret_key(name)
                and not _ENV_NOT_SECRET.search(name)):
            secrets.update((value, quote(value, safe=""), quote_plus(value)))
    return sorted(secrets, key=len, reverse=True)


def _mask_query_param(match: re.Match) -> str:
    name = match["name"]
    if _SECRET_KEY.search(name) or _SECRET_QUERY_NAME.search(name):
        return f"{name}={MASK}"
    return match[0]


def _mask_aws_secret(match: re.Match) -> str:
    return MASK if _looks_random(match[0]) else match[0]


def _looks_random(word: str) -> bool:
    """Mixed case plus a digit, / or +: true of all but ~1e-3 of real secret keys, false for hex
    digests (git SHAs), lower-case paths and plain words."""
    return (any(c.islower() for c in word) and any(c.isupper() for c in word)
            and any(c.isdigit() or c in "/+" for c in word))


def mask_secrets(tree: Any, path: str = "") -> Any:
    """A copy of `tree` in which secret-named keys are masked and every string (keys included)
    goes through `mask_text`."""
    if isinstance(tree, Mapping):
        return {mask_text(key) if isinstance(key, str) else key:
                mask_secrets(value, f"{path}.{key}" if path else str(key))
                for key, value in tree.items()}
    if path and is_secret_key(path) and tree is not None:
        return MASK
    if isinstance(tree, list):
        return [mask_secrets(item, path) for item in tree]
    if isinstance(tree, tuple):
        return tuple(mask_secrets(item, path) for item in tree)
    if isinstance(tree, str):
        return mask_text(tree)
    return tree


class _MaskingFilter(logging.Filter):
    """Masks what this module logs: an exception message may quote a URL or a config value."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = mask_text(record.getMessage()), None
        except Exception:  # a malformed call: logging reports it, and the message is not printed
            return True
        if record.exc_info:
            # Formatted here, masked, and kept as exc_text: a handler would format it unmasked.
            record.exc_text = mask_text("".join(traceback.format_exception(*record.exc_info)))
            record.exc_text, record.exc_info = record.exc_text.rstrip("\n"), None
        elif record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        return True


log.addFilter(_MaskingFilter())


def _param_value(value: Any) -> str:
    # params.yaml syntax (true, null, [1, 2]) so a logged value can be pasted into `dvc exp run -S`.
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def _safe_key(key: str) -> str:
    return _INVALID_KEY_CHARS.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]


def flatten_params(tree: Mapping[str, Any]) -> dict[str, str]:
    """`{"prepare": {"builtin": {"seed": 0}}}` -> `{"prepare.builtin.seed": "0"}`, secrets masked.

    Lists stay one value: a list of dilation rates is one setting, not four.
    """
    return _flatten(mask_secrets(dict(tree)), "")


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, path))
        else:
            flat[_safe_key(path)] = _param_value(value)
    return flat


def pipeline_key(commit: str | None, tree: Mapping[str, Any]) -> str:
    """Identifies one pipeline configuration: same commit and same resolved params, same key."""
    blob = json.dumps({"commit": commit, "params": tree}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def dict_text(obj: Any, name: str) -> str:
    """`obj` serialised as `MlflowClient.log_dict` would: YAML for .yaml/.yml, else JSON. Done here
    so that the text itself can be masked (a value `default=str` turns into text is no string
    in `obj`)."""
    if Path(name).suffix in (".yml", ".yaml"):
        return yaml.dump(obj, indent=2, default_flow_style=False)
    return json.dumps(obj, indent=2, default=str)


# Files larger than this are uploaded as they are: reading a multi-gigabyte table into memory to
# mask it would be worse than the (unlikely) secret inside.
MAX_MASKED_FILE_BYTES = 64 * 1024 * 1024
_BINARY_SNIFF_BYTES = 8192


def _masked_file_text(path: Path) -> str | None:
    """The masked content of text file `path` when masking changes it; None for a binary file
    (a NUL byte near the start, or not UTF-8), a huge one, or one with nothing to mask."""
    try:
        if path.stat().st_size > MAX_MASKED_FILE_BYTES:
            return None
        with open(path, "rb") as stream:
            if b"\0" in stream.read(_BINARY_SNIFF_BYTES):
                return None  # images, checkpoints: not read further
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    masked = mask_text(text)
    return None if masked == text else masked


def masked_artifact(path: Path, scratch: Path) -> Path:
    """What to upload for `path`: `path` itself when it holds nothing to mask, else a copy under
    `scratch` (same name; a directory copied whole) with its text files masked."""
    if not path.is_dir():
        masked = _masked_file_text(path)
        if masked is None:
            return path
        copy = scratch / path.name
        copy.write_bytes(masked.encode("utf-8"))
        return copy
    # Links followed, as the copy below and MLflow's upload follow them.
    files = [Path(root) / name for root, _, names in os.walk(path, followlinks=True)
             for name in names]
    changed = {file: text for file in files if (text := _masked_file_text(file)) is not None}
    if not changed:
        return path
    copy = scratch / "dir"  # only the contents are uploaded: the name is free
    shutil.copytree(path, copy)  # links become plain copies: writing below never reaches `path`
    for file, text in changed.items():
        (copy / file.relative_to(path)).write_bytes(text.encode("utf-8"))
    return copy


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- provenance

def _git(project_dir: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(project_dir: str | Path) -> str | None:
    """HEAD of the git repository holding `project_dir`; None outside git or before a commit."""
    return _git(Path(project_dir), "rev-parse", "HEAD")


def git_dirty(project_dir: str | Path) -> bool | None:
    """Whether tracked files differ from HEAD. dvc.lock is left out: `dvc repro` rewrites it
    after every stage, which would mark every later stage dirty."""
    status = _git(Path(project_dir), "status", "--porcelain", "--untracked-files=no", "--",
                  ".", ":(exclude,glob)**/dvc.lock")
    return None if status is None else bool(status)


def _stage_target(root: str, stage_name: str) -> str:
    """`name` or `path/dvc.yaml:name` (DVC's addressing, relative to the repo root) as an
    absolute target: DVC resolves targets against the CWD, which need not be the root."""
    path, sep, name = stage_name.rpartition(":")
    return f"{Path(root) / (path if sep else 'dvc.yaml')}:{name}"


def dvc_stage_hash(project_dir: str | Path, stage_name: str) -> str | None:
    """The DVC run-cache key of `stage_name` as its deps are now, or None when unavailable.

    It is what DVC itself hashes to recognise a run (`.dvc/cache/runs/<key[:2]>/<key>`): the
    command, every dep's content hash, the params values and the out paths, so it identifies the
    stage definition plus its inputs. dvc.lock is not read: it holds the previous run's hashes.
    """
    try:
        from dvc.repo import Repo
        from dvc.stage.serialize import to_single_stage_lockfile
        from dvc.utils import dict_sha256

        with Repo(str(project_dir)) as repo:
            stages = repo.stage.collect(_stage_target(repo.root_dir, stage_name))
            if len(stages) != 1:
                return None
            stage = stages[0]
            stage.save_deps()
            lock = to_single_stage_lockfile(stage)
    except Exception as exc:  # not a DVC repo, no such stage, a missing dep: just no tag
        log.debug("no dvc.stage_hash for %r: %s", stage_name, exc)
        return None
    # Same rule as DVC's run-cache key: outs by path only, sizes ignored.
    lock["outs"] = [out["path"] for out in lock.get("outs", [])]
    return dict_sha256(lock, exclude=["size", "nfiles"])


# --------------------------------------------------------------------------- runs

def _masked_pairs(pairs: Mapping[str, Any]) -> dict[str, str]:
    """Params or tags as MLflow stores them, masked by key name and by value. Callers outside
    this module (sweeps) log through here too, so nothing reaches MLflow unmasked."""
    masked: dict[str, str] = {}
    for key, value in pairs.items():
        text = str(value)
        if is_secret_key(key) and text not in ("null", "None", MASK):
            text = MASK
        masked[_safe_key(mask_text(str(key)))] = mask_text(text)
    return masked


def log_flat_params(client: MlflowClient, run_id: str, flat: Mapping[str, str]) -> None:
    params = [Param(key, value) for key, value in _masked_pairs(flat).items()]
    for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch)


def set_run_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    run_tags = [RunTag(key, value) for key, value in _masked_pairs(tags).items()]
    for batch in _chunks(run_tags, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=batch)


def create_masked_run(client: MlflowClient, experiment_id: str, name: str,
                      tags: Mapping[str, Any]) -> str:
    """`client.create_run` with the run name and tags masked; the new run's id."""
    return client.create_run(experiment_id, run_name=mask_text(name),
                             tags=_masked_pairs(tags)).info.run_id


def log_masked_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, mask_text(text), artifact_file)


def _log_config(client: MlflowClient, run_id: str, tree: Mapping[str, Any]) -> None:
    log_flat_params(client, run_id, flatten_params(tree))
    log_masked_text(client, run_id, yaml.safe_dump(mask_secrets(dict(tree)), sort_keys=False),
                    CONFIG_ARTIFACT)


def _runs_with_key(client: MlflowClient, experiment_id: str, key: str) -> list:
    runs = client.search_runs([experiment_id], f"tags.`{TAG_PIPELINE_KEY}` = '{key}'"
                              f" and tags.`{TAG_ROLE}` = 'pipeline'", max_results=50)
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def find_or_create_parent(client: MlflowClient, experiment_id: str, key: str,
                          commit: str | None, tree: Mapping[str, Any]) -> str:
    """The parent run of pipeline `key`, created (with params and config) on first use."""
    existing = _runs_with_key(client, experiment_id, key)
    if existing:
        return existing[0].info.run_id
    name = f"pipeline {(commit or 'nogit')[:8]} {key[:8]}"
    tags = {TAG_PIPELINE_KEY: key, TAG_ROLE: "pipeline", TAG_STAGE: "pipeline",
            TAG_GIT_COMMIT: commit or "none"}
    run_id = create_masked_run(client, experiment_id, name, tags)
    # Stages started at the same moment may each create one: all keep the oldest, extras go.
    winner = _runs_with_key(client, experiment_id, key)[0].info.run_id
    if winner != run_id:
        client.delete_run(run_id)
        return winner
    _log_config(client, run_id, tree)
    return run_id


def run_status(exc: BaseException | None) -> str:
    """FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED, for how the stage body ended."""
    if exc is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(exc, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return RunStatus.to_string(RunStatus.FINISHED)
    return RunStatus.to_string(RunStatus.FAILED)


class StageTracker:
    """Context manager: one MLflow child run for one stage, under the pipeline's parent run.

    While open, the run is also MLflow's active run in this thread, so fluent calls such as
    `mlflow.pytorch.log_model(model, name="model")` land in it. Leaving the block ends the run
    FINISHED, FAILED (exception) or KILLED (KeyboardInterrupt, SIGTERM), re-raising any exception;
    a parent this tracker found or created takes the same status, so it is never left RUNNING.
    """

    def __init__(self, params: Params, stage: str, project_dir: str | Path, *,
                 enabled: bool = True, dvc_stage: str | None = None,
                 tags: Mapping[str, Any] | None = None) -> None:
        self.params = params
        self.stage = stage
        self.project_dir = Path(project_dir).resolve()
        self.enabled = enabled
        # DVC tells a stage command its own name; `dvc_stage` serves runs outside `dvc repro`.
        self.dvc_stage = os.environ.get("DVC_STAGE") or dvc_stage or stage
        self.extra_tags = dict(tags or {})
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._client: MlflowClient | None = None
        self._owns_parent = False
        self._closing = False
        self._sigterm_pending = False
        self._sigterm_installed = False
        self._old_sigterm: Any = None
        self._uri_before: str | None = None
        self._uri_set = False

    # ---- lifecycle

    def __enter__(self) -> StageTracker:
        if not self.enabled:
            return self
        self._install_sigterm_handler()
        try:
            self._start()
        except BaseException as exc:
            self._finish(exc)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if self.enabled:
            self._finish(exc)
        return False

    def _start(self) -> None:
        self.tracking_uri = resolve_tracking_uri(self.params.tracking, self.project_dir)
        self._client = client = MlflowClient(self.tracking_uri)
        self.experiment_id = ensure_experiment(client, self.params.tracking.experiment,
                                               self.tracking_uri)
        tree = params_tree(self.params)
        commit = git_commit(self.project_dir)
        key = pipeline_key(commit, tree)
        self.parent_run_id = self._parent(client, key, commit, tree)
        tags = {TAG_PARENT: self.parent_run_id, TAG_ROLE: "stage", TAG_STAGE: self.stage,
                TAG_PIPELINE_KEY: key, **self._provenance_tags(commit), **self.extra_tags}
        self.run_id = create_masked_run(client, self.experiment_id, self.stage, tags)
        if self._owns_parent:
            client.update_run(self.parent_run_id, status="RUNNING")
        _log_config(client, self.run_id, tree)
        self._activate_fluent_run()

    def _parent(self, client: MlflowClient, key: str, commit: str | None,
                tree: Mapping[str, Any]) -> str:
        given = os.environ.get(PARENT_RUN_ENV)
        if given:
            client.get_run(given)  # fail early and clearly on a wrong id
            return given
        self._owns_parent = True
        return find_or_create_parent(client, self.experiment_id, key, commit, tree)

    def _provenance_tags(self, commit: str | None) -> dict[str, str]:
        tags: dict[str, str] = {}
        if commit:
            tags[TAG_GIT_COMMIT] = commit
            dirty = git_dirty(self.project_dir)
            if dirty is not None:
                tags[TAG_GIT_DIRTY] = str(dirty).lower()
        stage_hash = dvc_stage_hash(self.project_dir, self.dvc_stage)
        if stage_hash:
            tags[TAG_DVC_STAGE] = self.dvc_stage
            tags[TAG_DVC_STAGE_HASH] = stage_hash
        return tags

    def _activate_fluent_run(self) -> None:
        # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI; remember it to restore it.
        self._uri_before = os.environ.get(TRACKING_URI_ENV)
        mlflow.set_tracking_uri(self.tracking_uri)
        self._uri_set = True
        try:
            mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None)
        except MlflowException as exc:  # e.g. another experiment set active by the caller
            log.warning("stage run %s not made MLflow's active run: %s", self.run_id, exc)

    def _finish(self, exc: BaseException | None) -> None:
        """End the child (and an owned parent) with the status `exc` implies; never raises over
        the body's own exception."""
        self._closing = True  # a second SIGTERM must not interrupt the clean-up
        status = run_status(exc)
        try:
            if self.run_id is not None:
                if exc is not None and status != "FINISHED":
                    # Masked before the cut, so that no secret is cut past recognition.
                    self.set_tags({TAG_ERROR: mask_text(f"{type(exc).__name__}: {exc}")[:5000]})
                self._end_child(status)
            if self._owns_parent and self.parent_run_id is not None:
                self._client.set_terminated(self.parent_run_id, status)
        except Exception:
            if exc is None:
                raise
            log.exception("could not record the end of stage run %s", self.run_id)
        finally:
            self._restore_tracking_uri()
            self._restore_sigterm_handler()

    def _end_child(self, status: str) -> None:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self._client.set_terminated(self.run_id, status)

    def _restore_tracking_uri(self) -> None:
        # Only if it is still ours: another tracker in this process may have set its own since.
        if self._uri_set and os.environ.get(TRACKING_URI_ENV) == self.tracking_uri:
            mlflow.set_tracking_uri(self._uri_before)
        self._uri_set = False

    # ---- SIGTERM: `dvc`, Ray and schedulers stop a stage with it; end the run KILLED, not RUNNING

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:
            self._sigterm_pending = True  # delivered again once the run is closed
            return
        raise StageTerminated(f"stage '{self.stage}' received SIGTERM")

    def _restore_sigterm_handler(self) -> None:
        if not self._sigterm_installed:
            return
        # None: the old handler was set outside Python; the default is the closest match.
        signal.signal(signal.SIGTERM, self._old_sigterm or signal.SIG_DFL)
        self._sigterm_installed = False
        if self._sigterm_pending:
            signal.raise_signal(signal.SIGTERM)

    # ---- logging (all no-ops when disabled)

    @property
    def active(self) -> bool:
        return self.enabled and self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        now = get_current_time_millis()
        entries = [Metric(_safe_key(key), float(value), now, step or 0)
                   for key, value in metrics.items()]
        for batch in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Extra params (nested or flat), flattened and masked like the configuration."""
        if self.active:
            log_flat_params(self._client, self.run_id, flatten_params(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            set_run_tags(self._client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under `artifact_path` in the run; text files are
        uploaded masked (the files on disk stay as they are)."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            source = masked_artifact(Path(path), Path(tmp))
            if source.is_dir():
                self._client.log_artifacts(self.run_id, str(source), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(source), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib/plotly figure, or an image file, stored as artifact `name` (e.g.
        `plots/entropy.png`)."""
        if not self.active:
            return
        if isinstance(figure, (str, Path)):
            self._log_file_as(Path(figure), name)
        else:
            self._client.log_figure(self.run_id, figure, name)

    def _log_file_as(self, source: Path, name: str) -> None:
        target = Path(name)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / target.name
            masked = _masked_file_text(source)
            if masked is None:
                shutil.copyfile(source, copy)
            else:
                copy.write_bytes(masked.encode("utf-8"))
            parent = str(target.parent) if str(target.parent) != "." else None
            self._client.log_artifact(self.run_id, str(copy), parent)

    def log_dict(self, obj: Any, name: str) -> None:
        """`obj` as JSON or YAML (by the extension of `name`), masked."""
        if self.active:
            log_masked_text(self._client, self.run_id, dict_text(mask_secrets(obj), name), name)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            log_masked_text(self._client, self.run_id, text, name)

    def child_env(self) -> dict[str, str]:
        """Environment that nests runs of other processes (Ray workers, trials) under this run."""
        if not self.active:
            return {}
        return {PARENT_RUN_ENV: self.run_id, TRACKING_URI_ENV: self.tracking_uri}
