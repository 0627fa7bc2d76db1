"""Test helpers that users can run too: a provider simulator speaking the real wire protocols.

>>> from ai_query.testing import ProviderSimulator, Latency
>>> with ProviderSimulator(api_key="sk-sim", latency=Latency(0.2, p99_s=0.8), max_concurrency=64) as sim:
...     ...  # point an OpenAI client at sim.base_url, an Anthropic one at sim.url

From a shell: ``ai-query simulate --help`` (or ``python -m ai_query.testing --help``).
"""

from ._cli import simulator_main
from ._latency import Latency
from ._simulator import FAULT_KINDS, ProviderSimulator
from ._stats import SimulatorStats
from ._provider_formats import count_tokens

__all__ = ["FAULT_KINDS", "Latency", "ProviderSimulator", "SimulatorStats", "count_tokens", "simulator_main"]
