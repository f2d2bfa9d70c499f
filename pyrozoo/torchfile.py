"""Reading ``.pt`` files without running code from them.

A ``.pt`` file is a pickle, and unpickling may call any function the file names: a checkpoint, a pruned state
or an ``--init-from`` file that someone else made could run their code on the user's machine. pyrozoo's own
files hold only tensors and plain types (dicts, lists, numbers, strings), so every read goes through
:func:`load_tensors`, which uses torch's restricted unpickler (``weights_only=True``) and refuses anything else
in one line. A whole pickled ``nn.Module`` (``pyrozoo export``'s ``sparse_net.pt``) can only be opened by
unpickling it; :func:`load_tensors` does that only when the caller passes ``trust_pickle=True``, which the
command line exposes as ``--trust-pickle``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch

from pyrozoo.errors import PyrozooError

# torch's restricted unpickler opens its refusals with these words: of a file that names a function or class it
# does not allow (a "GLOBAL": a pickled module, or a hostile file), or of bytes that are no pickle at all
_REFUSED = "Weights only load failed"
# ... and of a pickle of protocol 4 or newer, whose FRAME opcode (149) the restricted unpickler does not read:
# such a file may be a plain state_dict (torch.save(..., pickle_protocol=4)) or anything else
_NEWER_PROTOCOL = "Unsupported operand 149"


class NotPlainTensors(PyrozooError):
    """The file holds Python objects, not only tensors and plain types: opening it could run code."""


# What to do about a refused file that pyrozoo itself would have written (a run file): it did not write it so.
RUN_FILE_FIX = (
    "pyrozoo writes its run files with tensors and plain types only, so another program wrote this one"
)


def load_tensors(
    path: str | os.PathLike,
    *,
    what: str | None = None,
    fix: str = RUN_FILE_FIX,
    trust_pickle: bool = False,
    mmap: bool = False,
):
    """The contents of the torch file ``path``, on the CPU, read without running code from it.

    A file that holds more than tensors and plain types raises :class:`NotPlainTensors`, one line naming the
    file (``what``, else its path) and ending with ``fix``, unless ``trust_pickle``: then it is unpickled in
    full, which may run code from it. Other failures (a missing file, a truncated one) are torch's own
    exceptions, for the caller to word.
    """
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns of a pickle protocol it may not read; the refusal says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not str(e).startswith(_REFUSED):
            raise
        newer = _NEWER_PROTOCOL in str(e)
        if "global" not in str(e).lower() and not newer:  # bytes it cannot read at all: corrupt
            detail = [line for line in str(e).splitlines()[1:] if line.strip() and "error:" not in line]
            raise pickle.UnpicklingError(detail[0] if detail else "not a torch file") from None
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        holds = (
            "it was pickled with protocol 4 or newer, which torch's restricted loader cannot read, so pyrozoo "
            "cannot tell what it would run"
            if newer
            else "it holds pickled Python objects, which could run code when opened"
        )
        raise NotPlainTensors(
            f"{what or Path(path)} is not a plain tensor file: {holds}, so pyrozoo does not open it; {fix}"
        ) from None
