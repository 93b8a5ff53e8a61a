"""The bundled Tpaga sandbox emulator (`billing sandbox`): Tpaga's card API under /api/ plus /__sandbox/."""

from billing.sandbox.server import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_KEY,
    SandboxConfig,
    SandboxThread,
    make_app,
    run,
)

__all__ = ["DEFAULT_PRIVATE_KEY", "DEFAULT_PUBLIC_KEY", "SandboxConfig", "SandboxThread", "make_app", "run"]
