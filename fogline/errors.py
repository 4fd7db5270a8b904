"""One exception tree for the whole project.

Each error says whether the caller can recover (retry, replay, fix the input)
or not; the CLI and the servers map these to exit codes / HTTP / protocol
errors in exactly one place each.
"""

from __future__ import annotations


class FoglineError(Exception):
    """Base class. `recoverable` tells a caller whether retrying can help."""

    recoverable: bool = False
    code: str = "fogline_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class ConfigError(FoglineError):
    """A configuration value or CLI argument is invalid."""

    code = "config"


class BundleError(FoglineError):
    """A bundle (edge or cloud directory) is missing, corrupt or mismatched."""

    code = "bundle"


class ExportError(FoglineError):
    """The export pipeline cannot produce a correct bundle from this source."""

    code = "export"


class VerificationError(ExportError):
    """An exported bundle does not reproduce the source model within tolerance."""

    code = "verification"


class BudgetError(ExportError):
    """No (split, quantization) candidate fits the requested device budget."""

    code = "budget"


class HiddenStateContractError(FoglineError):
    """llama.cpp's compute graph no longer exposes the tensor we read h_K from."""

    code = "hidden_contract"
