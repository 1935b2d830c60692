"""The built-in world: invented people with facts, small skills, the datasets every stage trains on,
and the gold verifier that scores any answer exactly."""

from posttrain.world.generate import WorldConfig, build, write
from posttrain.world.verifier import Score, Verifier

__all__ = ["WorldConfig", "build", "write", "Score", "Verifier"]
