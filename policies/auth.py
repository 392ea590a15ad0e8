"""Bearer JWT -> Principal. (Interface first; the full verifier lands with the auth issue.)"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: taken from verified token claims (or anonymous when auth is off)."""

    subject: str
    tenant: str | None = None
    tier: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    jti: str | None = None

    def may_use(self, model: str) -> bool:
        """Scopes name models (`model:NAME` or a bare NAME) or grant all (`*`, `models:*`)."""
        if not self.scopes or "*" in self.scopes or "models:*" in self.scopes:
            return True
        return model in self.scopes or f"model:{model}" in self.scopes


ANONYMOUS = Principal(subject="anonymous")
