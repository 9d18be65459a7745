"""Atomic, resumable checkpoints: modules, optimisers, grad scaler, step and every RNG state.

Checkpoints are files that may come from others (a shared `models/`, a DVC remote, a copied
project), so loading runs no code from them: `torch.load(weights_only=True)` accepts tensors and
plain data only, and everything saved here is kept to those types (the RNG states included).
"""
from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import random
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from segshift.components.io import atomic_write_bytes

# What the numpy RNG state of checkpoints from before weights-only loading pickled (numpy 1 and 2
# spell the reconstructor differently): such a file is old, not hostile, and says so.
OLD_RNG_GLOBALS = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                             "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"})
GLOBALS_SHOWN = 3
STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                            "BINSTRING", "STRING"})


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or belongs to another configuration."""


class OutdatedCheckpointError(CheckpointError):
    """A checkpoint of an older segshift (numpy arrays in its RNG state), refused with its own advice."""


# -- RNG state in types the weights-only unpickler accepts -------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    # python's state is a tuple of ints (and None or a float): plain data as it is
    state = {"python": random.getstate(), "numpy": _numpy_state_plain(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_plain() -> dict[str, Any]:
    """numpy's global MT19937 state with its key as an int64 tensor (a uint32 array would need
    numpy's reconstructor, which weights-only loading refuses)."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_state_from_plain(plain: dict[str, Any]) -> tuple:
    key = plain["key"].numpy().astype(np.uint32)
    return plain["bit_generator"], key, plain["pos"], plain["has_gauss"], plain["cached_gaussian"]


# -- saving and loading ----------------------------------------------------------------------------

def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise to memory, then write-and-rename: a crash never leaves a half-written file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    refused = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    if refused:
        # a file that loading would refuse is a bug here; better no checkpoint than one never readable
        raise TypeError(f"{path}: the checkpoint would hold {_examples(refused)}, which loading refuses; "
                        "store tensors and plain data (str, int, float, bool, None, list, tuple, dict)")
    return atomic_write_bytes(path, data)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's payload, loaded without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    state = _load_plain(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a segshift checkpoint (a {type(state).__name__}, not a dict)")
    return state


def _load_plain(path: Path) -> Any:
    """torch.load that accepts tensors and plain data only; CheckpointError names the file and why."""
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files; the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for foreign files
        raise refusal(str(path), unsafe_globals(path), exc) from None


def refusal(name: str, refused: list[str], exc: Exception) -> CheckpointError:
    if refused and set(refused) <= OLD_RNG_GLOBALS:
        return OutdatedCheckpointError(
            f"{name}: written by an older segshift (it holds numpy arrays, which are no longer loaded "
            "since loading runs no code from files); delete it to start the stage afresh")
    if refused:
        return CheckpointError(f"{name}: {unsafe_content(refused)}")
    return CheckpointError(f"{name}: not a readable checkpoint ({load_failure_reason(exc)})")


def unsafe_content(refused: list[str]) -> str:
    return (f"contains objects other than tensors and plain data ({_examples(refused)}); "
            "refusing to load it, since unpickling them could run code")


def unsafe_globals(source: str | Path | IO[bytes]) -> list[str]:
    """The classes and functions the file would import that weights-only loading refuses, found
    without running anything; [] when there are none or the file is not a pickle at all.

    torch.save writes zip archives, which torch inspects itself; any other file is a bare pickle
    (e.g. `pickle.dump`) that segshift never writes, read here opcode by opcode.
    """
    try:
        with _opened(source) as handle:
            if zipfile.is_zipfile(handle):
                handle.seek(0)
                return torch.serialization.get_unsafe_globals_in_checkpoint(handle)
            handle.seek(0)
            return _not_allowed(_pickle_globals(handle))
    except Exception:  # noqa: BLE001 - only the wording of the error depends on it
        return []


@contextlib.contextmanager
def _opened(source: str | Path | IO[bytes]) -> Iterator[IO[bytes]]:
    if hasattr(source, "seek"):
        source.seek(0)
        yield source
    else:
        with open(source, "rb") as handle:
            yield handle


def _pickle_globals(handle: IO[bytes]) -> list[str]:
    """`module.name` of each GLOBAL / STACK_GLOBAL / INST opcode, read with pickletools (no execution)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(handle):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(".".join(str(arg).split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif opcode.name in STRING_OPCODES:
                strings.append(str(arg))
    except Exception:  # noqa: BLE001 - a truncated or garbage stream: keep what was read
        pass
    return list(dict.fromkeys(found))


def _not_allowed(names: list[str]) -> list[str]:
    """Those of `names` that torch's weights-only unpickler would refuse (all, if torch's private
    allow-list moved: only the wording of an error depends on it)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        allowed = set()
    return [name for name in names if name not in allowed]


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:GLOBALS_SHOWN])
    return f"{shown}, … ({len(names)} in all)" if len(names) > GLOBALS_SHOWN else shown


def load_failure_reason(exc: Exception) -> str:
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        # torch's text advises loading with weights_only=False: the one thing never to do here
        return "not a file written by torch.save, or one holding data that loading refuses"
    if isinstance(exc, EOFError):
        return "empty or cut short"
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
