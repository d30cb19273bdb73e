"""Register the ``MESA`` (and ``CUSTOM``) attention backend names so they survive spawn."""

from __future__ import annotations

from mesa_vllm_patches import Patch, require_attribute

TARGET = "vllm.v1.attention.backends.registry.AttentionBackendEnum.MESA.__reduce_ex__"


def lookup_backend(name: str):
    """Unpickle a dynamically registered backend member in a fresh process."""
    import mesa_vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    mesa_vllm.register()
    return AttentionBackendEnum[name]


def apply() -> None:
    from mesa_vllm import BACKEND_PATH
    from vllm.v1.attention.backends import registry

    enum = require_attribute(registry, "AttentionBackendEnum", "AttentionBackendEnum")
    require_attribute(enum, "register", "AttentionBackendEnum.register")
    registry.register_backend(enum.CUSTOM, BACKEND_PATH)
    if "MESA" not in enum.__members__:
        member = enum.register("MESA", BACKEND_PATH)
        # Enum members pickle by value (the class path); a spawned process unpickles the
        # VllmConfig before any plugin runs, so the value lookup would fail there. Unpickle
        # through mesa-vllm instead, which registers the member first.
        member.__reduce_ex__ = lambda protocol: (lookup_backend, ("MESA",))


PATCH = Patch(
    name="backend_enum_pickle",
    target=TARGET,
    why=(
        "`--attention-backend mesa` needs a `MESA` member in AttentionBackendEnum. vLLM "
        "supports dynamic members, but pickles them by value; workers started with spawn "
        "unpickle the config before loading plugins and fail ('... is not a valid "
        "AttentionBackendEnum', notes B2)."
    ),
    how=(
        "register_backend(CUSTOM, path) and AttentionBackendEnum.register('MESA', path), "
        "then give the MESA member a __reduce_ex__ that unpickles through "
        "mesa_vllm_patches.backend_enum_pickle.lookup_backend, which registers it first."
    ),
    upstream="Dynamic backend members are an upstream feature; pickling them is not handled in 0.32.",
    remove_when="vLLM pickles dynamically registered backend members by name, or loads plugins before unpickling configs.",
    apply=apply,
)
