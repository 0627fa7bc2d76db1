"""Test helpers that users can run too: a provider simulator speaking the real wire protocol."""

from ._simulator import ProviderSimulator, SimulatorStats

__all__ = ["ProviderSimulator", "SimulatorStats"]
