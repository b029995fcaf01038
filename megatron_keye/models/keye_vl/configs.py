"""The model flavors' field tables now live in `megatron_keye/config/flavors.py` (they are plain
config data that config loading reads); this name stays so existing imports keep working."""

from megatron_keye.config.flavors import (  # noqa: F401
    FLAVORS,
    VISION_FLAVORS,
    flavor_fields,
    vision_flavor_fields,
)
