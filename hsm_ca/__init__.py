"""hsm-ca: a private certificate authority whose keys never leave an HSM engine.

The package's public surface is kept small; the CLI is built on the same
objects (see ``Authority``).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
