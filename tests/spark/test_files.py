"""``ai_query(..., files => content)``: images and PDFs reach the provider intact, over the real wire formats."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry
from ai_query.testing import ProviderSimulator


def png(width: int, height: int, seed: int) -> bytes:
    """A real (decodable) RGB PNG: signature, IHDR, IDAT, IEND with CRCs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes((seed + x + y) % 256 for x in range(width * 3)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def tag(kind: str, data: bytes) -> str:
    return f"[{kind} {len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:8]}]"


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def fspark(spark, sim):
    openai = {"openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": sim.base_url}}
    anthropic = {"anthropic_config": {"anthropic_api_key_plaintext": "sk-sim", "anthropic_api_base": sim.url}}

    def endpoint(name, provider, task, cfg):
        return {"name": name, "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "vision-model", "provider": provider, "task": task, **cfg}}]}, "client_config": {"max_attempts": 2}}

    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        endpoint("vision-openai", "openai", "llm/v1/chat", openai),
        endpoint("vision-anthropic", "anthropic", "llm/v1/chat", anthropic),
        endpoint("text-complete", "openai", "llm/v1/completions", openai),
    ]))
    spark_udfs.register(spark, registry)
    rows = [(0, png(4, 3, 0)), (1, png(2, 2, 9)), (2, PDF), (3, b"GIF89a\x01\x00\x01\x00"), (4, b"plain text, not a file"), (5, None)]
    spark.createDataFrame(rows, "id INT, content BINARY").createOrReplaceTempView("files_t")
    yield spark


@pytest.mark.parametrize("endpoint", ["vision-openai", "vision-anthropic"])
def test_files_arrive_intact_as_content_parts(fspark, endpoint):
    got = {r.id: r.r for r in fspark.sql(f"""
        SELECT id, ai_query('{endpoint}', 'Describe this file.', files => content, failOnError => false) AS r FROM files_t
    """).collect()}
    assert got[0].response == "echo: Describe this file.\n" + tag("image/png", png(4, 3, 0))
    assert got[1].response == "echo: Describe this file.\n" + tag("image/png", png(2, 2, 9))
    assert got[2].response == "echo: Describe this file.\n" + tag("application/pdf", PDF)
    assert got[3].response == "echo: Describe this file.\n" + tag("image/gif", b"GIF89a\x01\x00\x01\x00")
    assert got[4].response is None and "is not one of image/png" in got[4].errorMessage and "70 6c 61 69" in got[4].errorMessage
    assert got[5].response == "echo: Describe this file." and got[5].errorMessage is None  # no file: a text request


def test_an_array_of_files_goes_in_one_message(fspark):
    row = fspark.sql("""
        SELECT ai_query('vision-openai', 'Compare.', files => array(a.content, b.content)) AS r
        FROM files_t a JOIN files_t b ON a.id = 0 AND b.id = 2
    """).collect()[0]
    assert row.r == "echo: Compare.\n" + tag("image/png", png(4, 3, 0)) + "\n" + tag("application/pdf", PDF)


def test_the_dataframe_column_takes_files(fspark):
    from pyspark.sql import functions as F

    from spark_udfs import ai_query

    df = fspark.table("files_t").where("id = 1")
    row = df.select(ai_query("vision-anthropic", F.lit("Describe this file."), files="content").alias("r")).collect()[0]
    assert row.r == "echo: Describe this file.\n" + tag("image/png", png(2, 2, 9))


def test_a_bad_file_fails_the_query_by_default_naming_the_bytes(fspark):
    with pytest.raises(Exception, match="starting 70 6c 61 69 6e 20 74 65"):
        fspark.sql("SELECT ai_query('vision-openai', 'x', files => content) FROM files_t WHERE id = 4").collect()


@pytest.mark.parametrize("endpoint, why", [
    ("local-chat", "reads text only"),
    ("text-complete", "needs a chat endpoint"),
    ("local-embed", "needs a chat endpoint"),
])
def test_endpoints_that_cannot_read_files_are_refused_on_the_driver(fspark, endpoint, why):
    with pytest.raises(ArgumentError, match=why):
        fspark.sql(f"SELECT ai_query('{endpoint}', 'x', files => content) FROM files_t")
