"""HSM engines behind one interface (see base.py)."""

from hsm_ca.engine.base import KEY_TYPES, HsmEngine, KeyHandle, KeySpec, Role, UserInfo
from hsm_ca.engine.keys import as_private_key, key_type_of

__all__ = [
    "KEY_TYPES",
    "HsmEngine",
    "KeyHandle",
    "KeySpec",
    "Role",
    "UserInfo",
    "as_private_key",
    "key_type_of",
]
