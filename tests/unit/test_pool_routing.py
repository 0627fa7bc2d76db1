"""The vllm_pool config (validated at construction) and the prefix-affinity router (no engines)."""

from __future__ import annotations

import pytest

from ai_query import ConfigError, EndpointRegistry
from ai_query.config import VLLMPool
from ai_query._pool import PrefixAffinityRouter, prefix_hashes


def pool_endpoint(**pool):
    return {"name": "pool", "config": {"served_entities": [{"vllm_pool": {"model": "tiny-llama", "task": "llm/v1/chat", **pool}}]}}


def test_vllm_pool_entity_round_trips_and_names_its_model():
    ep = EndpointRegistry.from_data(pool_endpoint(replicas=2, mode="offline", options={"dtype": "float32"})).get("pool")
    assert ep.task == "llm/v1/chat"
    assert ep.entity.model_name == "tiny-llama" and ep.entity.name == "tiny-llama"
    assert ep.entity.vllm_pool == VLLMPool("tiny-llama", "llm/v1/chat", replicas=2, mode="offline", options=(("dtype", "float32"),))
    again = EndpointRegistry.from_data(ep.to_dict()).get("pool")
    assert again.entity.vllm_pool == ep.entity.vllm_pool


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"replicas": 0}, "vllm_pool.replicas must be >= 1"),
        ({"mode": "batch"}, "vllm_pool.mode is 'batch'; use one of server, offline"),
        ({"task": "llm/v1/embeddings"}, "use a local_model endpoint for embeddings"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be a fraction in (0, 1]"),
        ({"replicas": 2, "tensor_parallel_size": 2, "gpu_ids": [0, 1, 2]}, "needs 4; list 4 GPUs or change replicas"),
        ({"device": "cpu", "tensor_parallel_size": 2}, "need device 'cuda' or 'auto', not 'cpu'"),
        ({"options": {"dtype": "fp8"}}, "vllm_pool.options: options.dtype='fp8' is not one of"),
        ({"options": {"threads": 0}}, "options.threads=0 must be an integer >= 1"),
        ({"prefix_chars": 64}, "unknown field(s) 'prefix_chars'"),
    ],
)
def test_bad_vllm_pool_configs_name_the_field_and_the_fix(pool, message):
    data = pool_endpoint(**pool)
    with pytest.raises(ConfigError) as err:
        EndpointRegistry.from_data(data)
    assert message in str(err.value)
    assert "served_entities[0].vllm_pool" in str(err.value)


def test_a_served_entity_has_one_kind_only():
    data = pool_endpoint()
    data["config"]["served_entities"][0]["local_model"] = {"model": "tiny-llama", "task": "llm/v1/chat"}
    with pytest.raises(ConfigError, match="exactly one of external_model, local_model, vllm_pool"):
        EndpointRegistry.from_data(data)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


A, B, C = "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", "http://127.0.0.1:3/v1"
SYSTEM = "You are a careful assistant. " * 20  # 580 characters: two full 256-character blocks


def test_prefix_hashes_are_a_chain_over_full_blocks():
    assert prefix_hashes("x" * 255, 256) == []
    one, two = prefix_hashes(SYSTEM + "question one", 256), prefix_hashes(SYSTEM + "another question", 256)
    assert len(one) == 2 and one == two
    assert prefix_hashes("y" + SYSTEM, 256)[1] != one[1]  # same second block text, different prefix


def test_requests_sharing_a_prefix_stick_to_one_replica_until_it_is_overloaded():
    router = PrefixAffinityRouter(block_chars=256, max_imbalance=3)
    router.set_ready([A, B])
    picks = [router.pick(SYSTEM + f"question {i}") for i in range(4)]
    assert len(set(picks)) == 1  # 4 outstanding there, 0 on the other: 4 > 0 + 3 is the first to spill
    home = picks[0]
    other = B if home == A else A
    assert router.pick(SYSTEM + "question 4") == other  # imbalance 4 > 3: the idle replica takes it
    router.done(home)
    router.done(home)
    # both replicas now hold the prefix: the longest match with fewer outstanding wins
    assert router.outstanding() == {home: 2, other: 1}
    assert router.pick(SYSTEM + "question 5") == other


def test_distinct_prompts_spread_by_least_outstanding():
    router = PrefixAffinityRouter(block_chars=256, max_imbalance=0)
    router.set_ready([A, B, C])
    picks = [router.pick(f"short prompt {i}") for i in range(6)]
    assert sorted(router.sent().values()) == [2, 2, 2]
    for url in picks:
        router.done(url)
    assert set(router.outstanding().values()) == {0}


def test_cold_prefixes_go_to_the_same_replica_in_every_router():
    """Rendezvous hashing on the first block: two processes route a new prefix alike."""
    prompts = [f"template {k}: " + "z" * 300 for k in range(8)]
    first, second = PrefixAffinityRouter(), PrefixAffinityRouter()
    first.set_ready([A, B, C])
    second.set_ready([C, A, B])
    homes = []
    for p in prompts:
        homes.append(first.pick(p))
        assert second.pick(p) == homes[-1]
        first.done(homes[-1])
        second.done(homes[-1])
    assert len(set(homes)) > 1  # different prefixes spread over the replicas


def test_a_replica_marked_down_is_skipped_until_it_is_back_and_its_cache_is_forgotten():
    clock = Clock()
    router = PrefixAffinityRouter(block_chars=256, max_imbalance=8, clock=clock)
    router.set_ready([A, B])
    home = router.pick(SYSTEM + "q")
    other = B if home == A else A
    router.done(home)
    router.mark_down(home, 5.0)
    assert router.available() == [other]
    assert router.pick(SYSTEM + "q") == other
    clock.t = 6.0
    assert set(router.available()) == {A, B}
    # the restarted replica has an empty cache: the prefix now lives on the other one
    assert router.pick(SYSTEM + "q") == other
    router.set_ready([])
    assert router.pick("anything") is None
