"""The project's error hierarchy.

Every failure a user can cause or meet is one of these, so the CLI can turn
them into a single ``Error:`` line in one place, and library users can catch
``HsmCaError`` without also catching programming bugs.
"""

from __future__ import annotations


class HsmCaError(Exception):
    """Root of every error hsm-ca raises on purpose."""

    exit_code = 1


class UsageError(HsmCaError):
    """The command was called wrongly (maps to exit code 2)."""

    exit_code = 2


class ConfigError(HsmCaError):
    """A configuration file, home directory or environment value is unusable."""


class NotFound(HsmCaError):
    """A named CA, certificate, key, user or profile does not exist."""


class AlreadyExists(HsmCaError):
    """Creating something whose name is already taken."""


class EngineError(HsmCaError):
    """The HSM engine refused or failed an operation."""


class LoginFailed(EngineError):
    """Wrong PIN or unknown user."""


class LockedOut(EngineError):
    """The user is locked after too many failed logins."""


class PermissionDenied(EngineError):
    """The logged-in role may not perform this operation."""


class KeyNotFound(EngineError, NotFound):
    """No key with that label in the engine."""


class Tampered(EngineError):
    """The engine's storage failed its integrity check."""


class PolicyViolation(HsmCaError):
    """A request breaks the profile's or the CA's policy."""


class CsrRejected(PolicyViolation):
    """The CSR is malformed, badly signed or asks for something not allowed."""


class ProfileNotFound(PolicyViolation, NotFound):
    """No profile of that name."""


class ProfileInvalid(ConfigError):
    """A profile file does not validate."""


class AuditIntegrityError(HsmCaError):
    """The audit trail was altered, truncated or reordered."""
