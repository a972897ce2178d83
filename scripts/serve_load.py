"""Load a running serve.py with N concurrent clients: requests per second, tokens per second and time to first
token (median and 90th percentile), for each N given.

    python serve.py --checkpoint_path .../model.pth --compile --max_batch_size 32 &
    python scripts/serve_load.py --url http://127.0.0.1:8000 --clients 1 8 32
"""

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def one_request(client, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(
        model="any", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else float("nan"), time.perf_counter() - t0, tokens


def load(client, clients: int, requests: int, prompt: str, max_tokens: int) -> dict:
    """clients threads, each sending requests streamed completions one after another."""

    def worker(_):
        return [one_request(client, prompt, max_tokens) for _ in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests/s": len(results) / wall,
        "tokens/s": sum(r[2] for r in results) / wall,
        "TTFT median ms": 1e3 * statistics.median(ttft),
        "TTFT p90 ms": 1e3 * ttft[math.ceil(0.9 * len(ttft)) - 1],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description="Concurrent clients against a running serve.py.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's address")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, one run each")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max_tokens", type=int, default=128, help="tokens per completion")
    p.add_argument("--prompt", default="Once upon a time", help="the prompt of every request")
    a = p.parse_args(argv)
    try:
        import openai
    except ImportError:
        raise SystemExit("error: the load script needs the openai client: pip install openai") from None
    client = openai.OpenAI(base_url=a.url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    client.completions.create(model="any", prompt=a.prompt, max_tokens=4)  # warm: the first request may compile
    rows = [load(client, n, a.requests, a.prompt, a.max_tokens) for n in a.clients]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
