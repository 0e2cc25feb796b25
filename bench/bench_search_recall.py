"""Milvus Lite search: latency over exact search and recall@10, at 100k and 1M vectors.

Run: OMP_NUM_THREADS=2 .venv/bin/python bench/bench_search_recall.py [--sizes 100000 1000000]
     [--indexes HNSW IVF_FLAT IVF_SQ8 HNSW_SQ FLAT] [--queries 200] [--repeats 15]

Synthetic unit vectors of the default embedding model's size (read from the model): points
around 1,000 Gaussian centres (embeddings cluster by what they show), queries drawn the same
way, never in the gallery. Exact search is a brute-force ``torch`` matmul and top-k over all the
vectors, in this process. Each index type Milvus Lite builds is created in a fresh collection
(inserted in batches, flushed, indexed, loaded); its build time is reported with it.

Reported per size and index: recall@10 against exact search over ``--queries`` queries; the
latency of one query (``MilvusClient.search`` of one vector, top 10, through Milvus Lite's
in-process gRPC server) over the latency of exact search of one vector; and the same for all the
queries in one call (time per query). Ratios are medians of per-round ratios, rounds alternating
the two (``bench/common.py``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from itertools import cycle
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ratio, time_once  # noqa: E402

from fam_core.models.store import load_model  # noqa: E402

TOP_K = 10
INSERT_BATCH = 20_000
# build and search parameters: FAISS's and Milvus's usual defaults, the search side raised
# until recall@10 passes 0.95 on these vectors (see the benchmarks page); the gallery index's
# defaults (fam_core.search.index_types)
BUILD_PARAMS = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"},
    "IVF_FLAT": {"nlist": 128},
    "IVF_SQ8": {"nlist": 128},
    "FLAT": {},
}
SEARCH_PARAMS = {
    "HNSW": {"ef": 64},
    "HNSW_SQ": {"ef": 64},
    "IVF_FLAT": {"nprobe": 32},
    "IVF_SQ8": {"nprobe": 32},
    "FLAT": {},
}


def embedding_size(model_name: str) -> int:
    """The output size of ``model_name``, from one forward pass on a blank image."""
    loaded = load_model(model_name)
    side = loaded.config.input_size
    size = side if isinstance(side, int) else side[0]
    with torch.no_grad():
        return int(loaded.model(torch.zeros(1, 3, size, size)).shape[-1])


def clustered_unit_vectors(
    count: int, dimension: int, centres: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``count`` unit vectors, each a random centre plus Gaussian noise, normalised."""
    which = torch.randint(len(centres), (count,), generator=generator)
    noise = torch.randn(count, dimension, generator=generator) * 0.6
    return torch.nn.functional.normalize(centres[which] + noise, dim=1)


def exact_top_k(gallery: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Row indices of the ``TOP_K`` highest cosine scores (unit vectors: dot products)."""
    return (queries @ gallery.T).topk(TOP_K, dim=1).indices


def build_collection(client, name: str, gallery: torch.Tensor, index_type: str) -> float:
    """Seconds to create, fill, flush, index and load a collection of ``gallery``."""
    from pymilvus import DataType

    def build() -> None:
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=gallery.shape[1])
        client.create_collection(name, schema=schema)
        rows = gallery.numpy()
        for start in range(0, len(rows), INSERT_BATCH):
            batch = rows[start : start + INSERT_BATCH]
            client.insert(
                name,
                [{"id": start + i, "embedding": vector} for i, vector in enumerate(batch)],
            )
        client.flush(name)
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name="embedding",
            index_type=index_type,
            metric_type="COSINE",
            # one JSON "params" entry: Milvus Lite drops the flat entries pymilvus 3 sends
            params={"params": BUILD_PARAMS[index_type]},
        )
        client.create_index(name, index_params)
        client.load_collection(name)

    return time_once(build)


def milvus_top_k(client, name: str, queries: torch.Tensor, index_type: str) -> torch.Tensor:
    hits = client.search(
        name,
        data=queries.numpy().tolist(),
        limit=TOP_K,
        anns_field="embedding",
        search_params={"metric_type": "COSINE", "params": SEARCH_PARAMS[index_type]},
    )
    return torch.tensor([[hit["id"] for hit in row] for row in hits])


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of the true top-k each query's answer holds."""
    per_query = [
        len(set(f.tolist()) & set(t.tolist())) / TOP_K for f, t in zip(found, truth, strict=True)
    ]
    return statistics.mean(per_query)


def measure(
    client, index_type: str, gallery: torch.Tensor, queries: torch.Tensor, repeats: int
) -> str:
    """One table row: build ``index_type`` over ``gallery``, then time and score ``queries``."""
    size = len(gallery)
    name = f"vectors_{index_type.lower()}"
    build_seconds = build_collection(client, name, gallery, index_type)
    truth = exact_top_k(gallery, queries)
    found = milvus_top_k(client, name, queries, index_type)
    milvus_queries, exact_queries = cycle(queries.split(1)), cycle(queries.split(1))
    one, milvus_one, exact_one = ratio(
        lambda: milvus_top_k(client, name, next(milvus_queries), index_type),
        lambda: exact_top_k(gallery, next(exact_queries)),
        repeats=repeats,
    )
    batched, milvus_all, exact_all = ratio(
        lambda: milvus_top_k(client, name, queries, index_type),
        lambda: exact_top_k(gallery, queries),
        repeats=max(3, repeats // 3),
        warmup=1,
    )
    client.drop_collection(name)
    return (
        f"| {size:,} | {index_type} | {build_seconds:.1f} | {recall(found, truth):.3f} | "
        f"{1000 * exact_one:.2f} | {1000 * milvus_one:.2f} | {one:.1f} | "
        f"{1000 * exact_all / len(queries):.3f} | {1000 * milvus_all / len(queries):.3f} | "
        f"{batched:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--indexes", nargs="+", default=["HNSW", "IVF_FLAT", "IVF_SQ8", "HNSW_SQ", "FLAT"]
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", default="default-embedding")
    args = parser.parse_args()
    import milvus_lite
    import pymilvus
    from pymilvus import MilvusClient

    from fam_core.search.milvus import LITE_CLIENT_OPTIONS

    dimension = embedding_size(args.model)
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(1000, dimension, generator=generator)
    print(
        f"pymilvus {pymilvus.__version__}, milvus-lite {milvus_lite.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); {args.model}: "
        f"{dimension} dimensions; {args.queries} queries, top {TOP_K}, {args.repeats} rounds"
    )
    print(
        "| vectors | index | build (s) | recall@10 | exact, 1 query (ms) | Milvus Lite, "
        "1 query (ms) | ratio | exact, batch (ms/query) | Milvus Lite, batch (ms/query) "
        "| ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        for size in args.sizes:
            gallery = clustered_unit_vectors(size, dimension, centres, generator)
            queries = clustered_unit_vectors(args.queries, dimension, centres, generator)
            client = MilvusClient(str(work / f"gallery-{size}.db"), **LITE_CLIENT_OPTIONS)
            for index_type in args.indexes:
                print(measure(client, index_type, gallery, queries, args.repeats), flush=True)
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
