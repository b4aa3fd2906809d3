"""vLLM's flags where they mean something here: aliases, names, and the ones refused with a reason."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import SMALL, error_of

from needle.engine.config import EngineArgs
from needle.server.cli import build_parser


def test_block_size_is_page_size_and_chunked_prefill_is_always_on():
    ns = build_parser().parse_args(["serve", "--block-size", "32", "--enable-chunked-prefill"])
    args = EngineArgs.from_cli_args(ns)
    assert args.page_size == 32 and args.enable_chunked_prefill
    with pytest.raises(ValueError, match="always prefills in chunks"):
        EngineArgs.from_cli_args(build_parser().parse_args(["serve", "--no-enable-chunked-prefill"]))


def test_several_served_model_names(serve):
    server = serve(*SMALL, "--served-model-name", "needle-small", "gpt-4o-mini")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["needle-small", "gpt-4o-mini"]
    for name in ("needle-small", "gpt-4o-mini"):
        r = client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
        assert r.model == "needle-small" and r.usage.completion_tokens == 2
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=30,
                   json={"model": "other", "prompt": "Hi", "max_tokens": 2})
    assert error_of(r, 404)["param"] == "model"
