"""Search benchmark: FAISS against exact search at scale, sparse (shared codes) against dense, the server under load.

Writes ``docs/results/search.json`` and ``docs/results/search.md``. Build an index of the style split with a
discrete-bridge model first, then run (about 15 minutes on 2 cores):

    codebridge index --model runs/emoji-fdt/model --data emoji-style:test --out runs/search-style
    python benchmarks/search.py --index runs/search-style --n 1000000 --clients 16 --seconds 60

1. ANN: the index's embeddings plus generated ones (real vectors with Gaussian noise, renormalised) up to ``--n``,
   the engine ``auto`` picks for that size, recall@10 against an exact scan, queries/s (batched and one by one).
2. Sparse vs dense on the index's own collection: text queries are the items' captions, the relevant item is the
   caption's own; recall@10, latency per query and index bytes per item.
3. Server: ``codebridge serve`` in a subprocess, ``--clients`` threads posting text queries for ``--seconds``;
   p50/p99 latency, errors, and the server's RSS at the start and end of the run.
``--small`` shrinks every part to seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from codebridge.search.ann import DenseIndex, brute_force, build_ann
from codebridge.search.searcher import Searcher

ROOT = Path(__file__).resolve().parents[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def grow(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``real`` plus noisy copies of it up to ``n`` rows, L2-normalised like the model's embeddings."""
    rng = np.random.default_rng(seed)
    extra = real[rng.integers(0, len(real), max(0, n - len(real)))]
    extra = extra + rng.normal(scale=0.3 / np.sqrt(real.shape[1]), size=extra.shape).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return np.concatenate([real, extra.astype(np.float32)])


def ann_part(searcher: Searcher, n: int, queries: np.ndarray, kind: str) -> dict[str, Any]:
    vectors = grow(searcher.embeddings, n)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        params = build_ann(vectors, Path(tmp), kind=kind)
        build_s = time.perf_counter() - start
        dense = DenseIndex(Path(tmp), vectors)
        start = time.perf_counter()
        _, rows = dense.search(queries, 10)
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        for q in queries[:200]:
            dense.search(q[None], 10)
        single_s = (time.perf_counter() - start) / min(200, len(queries))
    _, truth = brute_force(vectors, queries, 10)
    return {
        "vectors": len(vectors),
        "dim": vectors.shape[1],
        "engine": params,
        "build_s": build_s,
        "recall_at_10": recall(rows, truth),
        "queries_per_s_batched": len(queries) / batched_s,
        "queries_per_s_single": 1 / single_s,
        "threads": faiss.omp_get_max_threads(),
    }


def sparse_part(searcher: Searcher, limit: int) -> dict[str, Any]:
    rows = [r for r, item in enumerate(searcher.items) if item["caption"]][:limit]
    out: dict[str, Any] = {"queries": len(rows), "dense_bytes_per_item": searcher.embeddings.shape[1] * 4}
    queries = [searcher.embed("text", searcher.items[r]["caption"]) for r in rows]
    for mode in searcher.modes:
        hits, start = [], time.perf_counter()
        for q in queries:
            hits.append([h["id"] for h in searcher.search_query(q, 10, mode)])
        elapsed = time.perf_counter() - start
        wanted = [searcher.items[r]["id"] for r in rows]
        out[mode] = {
            "recall_at_10": float(np.mean([w in h for w, h in zip(wanted, hits, strict=True)])),
            "ms_per_query": 1000 * elapsed / len(queries),
        }
    if searcher.sparse is not None:
        out["sparse_bytes_per_item"] = searcher.sparse.nbytes / len(searcher.items)
        out["bytes_ratio"] = out["dense_bytes_per_item"] / out["sparse_bytes_per_item"]
        out["speed_ratio"] = out["dense"]["ms_per_query"] / out["sparse"]["ms_per_query"]
        out["recall_loss"] = out["dense"]["recall_at_10"] - out["sparse"]["recall_at_10"]
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_part(index: Path, captions: list[str], clients: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "codebridge", "serve", "--index", str(index), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client(seed: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            i = seed
            while time.monotonic() < stop:
                body = json.dumps({"text": captions[i % len(captions)], "k": 10})
                start = time.perf_counter()
                try:
                    conn.request("POST", "/search", body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                except OSError:
                    ok, conn = False, http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    errors[0] += not ok
                i += clients

        rss_start = rss_mb(server.pid)
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": errors[0],
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
    }


def markdown(result: dict[str, Any]) -> str:
    ann, sparse, server = result["ann"], result["sparse"], result["server"]
    lines = [
        "# Search benchmark",
        "",
        f"`{result['command']}` on {os.cpu_count()} CPU(s).",
        "",
        "| part | figure |",
        "|---|---|",
        f"| ANN ({ann['engine']['kind']}, {ann['vectors']:,} x {ann['dim']}) | recall@10 {ann['recall_at_10']:.3f}, "
        f"{ann['queries_per_s_batched']:,.0f} queries/s batched, {ann['queries_per_s_single']:,.0f} one by one, "
        f"built in {ann['build_s']:.0f} s |",
    ]
    for mode in ("dense", "sparse", "hybrid"):
        if mode in sparse:
            lines.append(
                f"| {mode} on the collection ({sparse['queries']} caption queries) | "
                f"R@10 {sparse[mode]['recall_at_10']:.3f}, {sparse[mode]['ms_per_query']:.2f} ms/query |"
            )
    if "bytes_ratio" in sparse:
        lines.append(
            f"| sparse vs dense | {sparse['bytes_ratio']:.1f}x smaller ({sparse['sparse_bytes_per_item']:.0f} vs "
            f"{sparse['dense_bytes_per_item']} bytes/item), {sparse['speed_ratio']:.1f}x faster, "
            f"R@10 loss {sparse['recall_loss']:+.3f} |"
        )
    lines.append(
        f"| server, {server['clients']} clients x {server['seconds']:.0f} s | {server['requests_per_s']:.0f} req/s, "
        f"p50 {server['p50_ms']:.0f} ms, p99 {server['p99_ms']:.0f} ms, {server['errors']} errors, "
        f"RSS {server['rss_mb_start']:.0f} -> {server['rss_mb_end']:.0f} MB |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index folder (codebridge index)")
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors for the ANN part (default 1M)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ann", default="auto", help="ANN engine (default auto: what codebridge index picks)")
    parser.add_argument("--small", action="store_true", help="seconds-long smoke run (5k vectors, IVF, 2 clients, 2 s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="folder for search.{json,md}")
    args = parser.parse_args(argv)
    if args.small:
        args.n, args.queries, args.clients, args.seconds, args.ann = 5000, 50, 2, 2.0, "ivf"
    searcher = Searcher(args.index)
    captions = [item["caption"] for item in searcher.items if item["caption"]] or ["a query"]
    query_vectors = np.stack([searcher.embed("text", c).dense for c in captions[: args.queries]])
    query_vectors = np.resize(query_vectors, (args.queries, query_vectors.shape[1]))
    result = {
        "command": " ".join(["python benchmarks/search.py", *(argv if argv is not None else sys.argv[1:])]),
        "ann": ann_part(searcher, args.n, query_vectors, args.ann),
        "sparse": sparse_part(searcher, args.queries),
        "server": server_part(args.index, captions, args.clients, args.seconds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(result, indent=1))
    (args.out / "search.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
