# Every target sets up .venv itself. torch/torchvision are pinned: on this project's machines pip takes exactly these
# from local disk (elsewhere pip downloads them: a CUDA build, several GB).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ZOO    := $(VENV)/.installed-zoo
PYTEST ?= -q

.PHONY: install test test-slow demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[onnx,plots,test]'
	touch $(STAMP)

# the slow suite's model zoos (ultralytics, MONAI, smp, transformers); torch pinned again so pip keeps it
$(ZOO): $(STAMP)
	$(PY) -m pip install -q -e '.[onnx,plots,test,zoo]' torch==2.14.1 torchvision==0.29.1
	touch $(ZOO)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST)

test-slow: $(ZOO)
	$(PY) -m pytest $(PYTEST) -m slow

demo: $(STAMP)
	$(VENV)/bin/sgs-fx demo

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --quick
	$(PY) benchmarks/mi_speed.py --quick

clean:
	rm -rf $(VENV) build *.egg-info  # not runs/: your training runs and checkpoints live there
