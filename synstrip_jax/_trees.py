"""Old private name of :mod:`synstrip_jax.trees` (every access warns)."""

from synstrip_jax._deprecated import deprecated_getattr

__all__: list[str] = []

__getattr__ = deprecated_getattr(__name__, {
    name: ("synstrip_jax.trees", name)
    for name in ("aligned_leaves", "describe", "is_none", "leaves_with_path",
                 "path_str")})
