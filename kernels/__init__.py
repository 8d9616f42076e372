"""Hot numeric code, each kernel beside the plain reference version its tests compare it with."""

from .momentum import momentum_update, momentum_update_foreach, momentum_update_reference

__all__ = ["momentum_update", "momentum_update_foreach", "momentum_update_reference"]
