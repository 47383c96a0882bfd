"""Typed run configuration: the schema (`config.schema`) and how user input becomes it
(`config.loading`).

`load_config(path, overrides)` is the one edge where user input becomes a `RunConfig`: YAML
(optional) is merged with `section.key=value` overrides, every key is checked against the
dataclass fields (unknown ones are refused with the closest valid key), every value is converted
to its field's type, and the whole config is validated once. Everything after this point trusts
the config. Errors are `ConfigError`s that name the field and the fix.
"""

from mlra_mega.config.loading import *  # noqa: F401,F403
from mlra_mega.config.loading import __all__ as _loading_all
from mlra_mega.config.schema import *  # noqa: F401,F403
from mlra_mega.config.schema import __all__ as _schema_all
from mlra_mega.config.schema import _all_dotted_keys  # noqa: F401 - the fuzz tests and key hints use it

__all__ = [*_schema_all, *_loading_all]
