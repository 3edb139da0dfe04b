# GF-Screen: every target sets up what it needs. `make demo` screens a CT, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CT ?=
OUT ?= output/demo

.PHONY: setup system-deps demo test test-all lint format bench pack clean

# The environment takes about 8.2 GB (MONAI Label needs torchvision, whose wheel brings a CUDA build of torch):
# check the disk first so that a full one fails with this message, not half-way through pip.
NEED_GB := 9
$(VENV)/.installed: requirements.lock
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge $(NEED_GB) ] || \
	  { echo "make setup: $(NEED_GB) GB of free disk needed for $(VENV), $$free GB free in $$(pwd)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --no-deps -r requirements.lock
	touch $@

setup: $(VENV)/.installed

# Code style as the model-zoo checks it (black, isort, flake8 at 120 columns: pyproject.toml, setup.cfg; the bundle
# configs as its pre-commit's pretty-format-json writes them). `make format` rewrites, `make lint` only checks.
# The tools are pinned in requirements-dev.lock and go into the venv, which is set up first only where it is missing.
DEV_TOOLS := $(VENV)/.dev-installed
PY_SOURCES := bundle monailabel_app tests
JSON_CONFIGS = $(wildcard bundle/configs/*.json)
PRETTY_JSON := $(VENV)/bin/pretty-format-json --no-sort-keys --indent=4
$(DEV_TOOLS): requirements-dev.lock
	@[ -f $(VENV)/.installed ] || $(MAKE) setup
	$(PY) -m pip install --quiet --no-cache-dir --no-deps -r requirements-dev.lock
	touch $@

format: $(DEV_TOOLS)
	$(VENV)/bin/isort --quiet $(PY_SOURCES)
	$(VENV)/bin/black --quiet $(PY_SOURCES)
	$(PRETTY_JSON) --autofix $(JSON_CONFIGS) >/dev/null || $(PRETTY_JSON) $(JSON_CONFIGS)

lint: $(DEV_TOOLS)
	$(VENV)/bin/isort --check-only --diff $(PY_SOURCES)
	$(VENV)/bin/black --check --diff $(PY_SOURCES)
	$(VENV)/bin/flake8 --count --statistics $(PY_SOURCES)
	$(PRETTY_JSON) $(JSON_CONFIGS)

# Orthanc with its DICOMweb and GDCM plugins (DICOMweb tests) and Chromium (OHIF in a browser) come from Debian;
# installed only when running as root with apt, else those tests skip.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb orthanc-gdcm chromium fonts-liberation
system-deps:
	@{ command -v Orthanc && command -v chromium && [ -f /usr/share/orthanc/plugins/libOrthancGdcm.so ]; } >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null) \
	  || echo "Orthanc or Chromium not installed: DICOMweb and browser tests will be skipped"; }

# Screen one CT (CT=path to NIfTI/NRRD/DICOM folder) or, by default, a synthetic phantom, with the shipped weights.
demo: setup
	cd bundle && ../$(PY) -m scripts.cli.screen $(if $(CT),--input $(CT),) --output_dir ../$(OUT)

test: setup system-deps
	$(PY) -m pytest -q tests

# Everything, slow tests included.
test-all: setup system-deps
	$(PY) -m pytest -q -m "" tests

# What users wait for (the screening command per scan and stage, batch scans per hour, a MONAI Label round trip)
# and the model beside MONAI sliding-window inference and the wholeBody_ct_segmentation network: docs/benchmarks.md.
bench: setup
	cd bundle && ../$(PY) -m scripts.cli.benchmark --output ../docs/benchmarks.md

pack: setup
	cd bundle && ../$(PY) -m scripts.cli.pack --output ../dist

clean:
	rm -rf $(VENV) output dist
