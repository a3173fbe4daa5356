"""A plugin module that fails at import time, as a plugin with a missing dependency would."""

import higher_optim_testplugin_missing_dependency  # type: ignore[import-not-found]  # noqa: F401
