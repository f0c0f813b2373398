"""The runtime's ``sd3-tiny`` export fixtures (``pruned_export``, ``tiny_pipe``) serve the bench tests too."""

from tests.runtime.conftest import pruned_export, tiny_pipe  # noqa: F401 - fixtures
