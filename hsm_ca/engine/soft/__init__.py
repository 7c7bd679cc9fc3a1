"""The built-in software HSM engine (see keystore.py)."""

from hsm_ca.engine.soft.keystore import DEFAULT_SCRYPT_N, SoftEngine

__all__ = ["DEFAULT_SCRYPT_N", "SoftEngine"]
