"""Make the PixArt family and its offline models resolvable in this session.

Installed packages list ``pixart-sigma = tokprune.families.pixart:FAMILY`` in the ``tokprune.families``
entry-point group; registering by hand as well keeps these tests independent of whether the
editable install has been refreshed since (same instance, so it is a no-op when it has).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def pixart_family():
    from tokprune import models
    from tokprune.families.pixart import FAMILY
    from tokprune.pruning.family import register_family

    register_family(FAMILY, replace=True)
    known = models.available_models()
    for name, (loader, description) in FAMILY.builtins().items():
        if name not in known:
            models.register_builtin(name, loader, description)
    for alias, hub_id in FAMILY.aliases.items():
        models.MODEL_ALIASES.setdefault(alias, hub_id)
    return FAMILY
