"""Device assignment of a vLLM pool (``gpu_workers.plan_pool``): the GPU plan is checked here, since
no GPU exists on the test machines; the CPU plan is also what the integration tests run."""

from __future__ import annotations

import pytest

from gpu_workers import plan_pool

TINY = {"model": "tiny-llama", "task": "llm/v1/chat"}


def test_one_replica_per_tensor_parallel_group_of_gpus():
    plan = plan_pool({**TINY, "replicas": 2, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8}, gpus=4)
    assert plan.device == "cuda"
    assert [env["CUDA_VISIBLE_DEVICES"] for env in plan.replica_env] == ["0,1", "2,3"]
    assert plan.extra_args == ("--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8")


def test_gpu_ids_pick_the_devices():
    plan = plan_pool({**TINY, "replicas": 3, "gpu_ids": [5, 6, 7]}, gpus=8)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in plan.replica_env] == ["5", "6", "7"]


def test_too_few_gpus_is_an_error_that_says_how_many():
    with pytest.raises(ValueError, match=r"need 4 GPU\(s\) .* but this node has 2; lower replicas"):
        plan_pool({**TINY, "replicas": 2, "tensor_parallel_size": 2, "device": "cuda"}, gpus=2)


def test_auto_is_cpu_without_gpus_and_splits_the_cores():
    plan = plan_pool({**TINY, "replicas": 2}, gpus=0, cores=[0, 1, 2, 3])
    assert plan.device == "cpu" and plan.extra_args == ()
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in plan.replica_env] == ["0-1", "2-3"]
    threads = plan_pool({**TINY, "replicas": 2, "options": {"threads": 1}}, gpus=0, cores=[0, 1, 2, 3])
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in threads.replica_env] == ["0", "1"]
    shared = plan_pool({**TINY, "replicas": 3, "options": {"cpu_bind": "nobind"}}, gpus=0, cores=[0, 1])
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in shared.replica_env] == ["nobind"] * 3


def test_more_replicas_than_cores_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match="lower replicas or options.threads, or set options.cpu_bind to 'nobind'"):
        plan_pool({**TINY, "replicas": 3}, gpus=0, cores=[0, 1])


def test_the_same_config_names_the_same_pool_and_a_different_one_another():
    a = plan_pool({**TINY, "replicas": 2}, gpus=0, cores=[0, 1])
    b = plan_pool({**TINY, "replicas": 2, "mode": "offline", "options": {"dtype": "float32"}}, gpus=0, cores=[0, 1])
    c = plan_pool({**TINY, "replicas": 1}, gpus=0, cores=[0, 1])
    assert a.name == b.name  # float32 is the default; the mode does not change the engines
    assert c.name != a.name and c.name.startswith("tiny-llama-x1-")
