"""Mock OpenAI-compatible model server with known latencies (`llm-loadtest mock-server`).

The quickstart's default target and the ground truth of accuracy tests: TTFT, inter-token
latency, output length and error rate are configured, so measurements can be checked; its
`style` makes it stream as vLLM, SGLang, TGI, llama.cpp or a proxy would (`mockserver.styles`).
It can count with a real tokenizer and add a known template overhead (`mockserver.tokens`),
model a prefix cache (`mockserver.prefix_cache`) and stream reasoning deltas (style
`reasoning`), so production-like traffic has a ground truth too.
"""

from mockserver.app import MockStats, create_app
from mockserver.config import MockConfig
from mockserver.server import MockServer

__all__ = ["MockConfig", "MockServer", "MockStats", "create_app"]
