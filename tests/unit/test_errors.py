import pickle

import pytest

import ai_query
from ai_query import (
    AIQueryError,
    ArgumentError,
    BadRequestError,
    ConfigError,
    CronError,
    EndpointError,
    LocalEngineError,
    RateLimitedError,
    ServingError,
    UnknownEndpointError,
    UnsupportedFileError,
    recover_error,
)


def test_every_error_roots_in_aiqueryerror():
    from batch_runner import CronError as BatchCronError
    from gpu_workers import LocalServerError, ModelBuildError
    from spark_udfs._delta import DeltaReadError, DeltaWriteError

    for cls in (ServingError, BadRequestError, RateLimitedError, CronError, UnsupportedFileError,
                LocalServerError, ModelBuildError, DeltaWriteError, DeltaReadError):
        assert issubclass(cls, AIQueryError), cls
    assert BatchCronError is CronError and issubclass(CronError, ConfigError)
    assert issubclass(LocalServerError, LocalEngineError) and issubclass(ModelBuildError, LocalServerError)
    assert issubclass(BadRequestError, ServingError) and issubclass(UnsupportedFileError, ArgumentError)
    # still caught where a ValueError used to be expected
    assert issubclass(CronError, ValueError) and issubclass(UnsupportedFileError, ValueError)


def test_the_tree_in_the_docstring_names_every_public_error():
    public = {name for name in ai_query.__all__ if name.endswith("Error")}
    for name in public:
        assert name in ai_query._errors.__doc__, name


def test_serving_rate_limiter_raises_the_core_rate_limit_error():
    from ai_query.config import RateLimit
    from ai_query.serving import RateLimiter

    limiter = RateLimiter(clock=lambda: 0.0)
    limiter.admit("ep", [RateLimit(1)], "alice")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("ep", [RateLimit(1)], "alice")
    assert info.value.retry_after == pytest.approx(60.0)
    assert info.value.status_code == 429
    assert "rate limit of serving endpoint 'ep' exceeded: 1 calls per minute per user" in str(info.value)


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("endpoints[0].client_config.max_concurrency must be >= 1, got 0"),
        UnknownEndpointError("nope", ["local-chat"]),
        RateLimitedError("slow down", retry_after=2.5, request_id="r1"),
        ServingError(403, "PERMISSION_DENIED", "no", {"X": "y"}),
        BadRequestError("bad body", 404, "model_not_found", param="model"),
        CronError("minute field: 61 is out of range"),
    ],
)
def test_errors_pickle_with_their_attributes(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.__dict__ == error.__dict__


SPARK_FAILURE = """\
pyspark.errors.exceptions.captured.PythonException:
  An exception was thrown from the Python worker. Please see the stack trace below.
Traceback (most recent call last):
  File "/x/spark_udfs/_udf.py", line 1, in f
    raise ValueError("first")
ValueError: first

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/ai_query/_client.py", line 2, in g
ai_query._errors.SystemicEndpointError: endpoint 'chat' answered 401: invalid api key; check the key
\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunner.scala:1)
"""


def test_recover_error_rebuilds_our_typed_error_from_spark_text():
    error = recover_error(SPARK_FAILURE, AIQueryError)
    assert type(error) is ai_query.SystemicEndpointError
    assert str(error) == "endpoint 'chat' answered 401: invalid api key; check the key"
    assert error.status_code is None  # the text carries the message only


def test_recover_error_keeps_to_the_expected_type_and_its_subclasses():
    assert recover_error(SPARK_FAILURE, ConfigError) is None
    assert isinstance(recover_error(SPARK_FAILURE, EndpointError), ai_query.SystemicEndpointError)
    assert recover_error("ValueError: not ours", AIQueryError) is None
    assert recover_error("", AIQueryError) is None


def test_recover_error_finds_errors_of_other_packages_and_unusual_constructors():
    from spark_udfs._delta import DeltaWriteError

    error = recover_error("...\nspark_udfs._delta.DeltaWriteError: txnVersion must be an integer >= 0, got -1\n...", DeltaWriteError)
    assert type(error) is DeltaWriteError and str(error) == "txnVersion must be an integer >= 0, got -1"
    unknown = recover_error("ai_query._errors.UnknownEndpointError: unknown endpoint 'x': known endpoints are 'a'.", AIQueryError)
    assert type(unknown) is UnknownEndpointError and str(unknown).startswith("unknown endpoint 'x'")
    # the last error line wins: the one that ended the task
    last = recover_error("ConfigError: first\nArgumentError: second", AIQueryError)
    assert type(last) is ArgumentError and str(last) == "second"
