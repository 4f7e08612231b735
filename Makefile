# `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
OUT := out
DEMO_BUNDLE := $(OUT)/bundles/lesion-unet
ECHO_CINE = $$($(PY) -c "from pydicom.data import get_testdata_file; print(get_testdata_file('color3d_jpeg_baseline.dcm'))")

.PHONY: demo demo-fusion demo-archive test test-py310 lint typecheck pytest docs proto train clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch first, so nothing can pull a multi-GB CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[export,demo,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgescope export --name lesion-unet --out $(DEMO_BUNDLE) --overwrite \
		--factory examples/ultrasound_unet/model.py:build --weights examples/ultrasound_unet/weights.pt \
		--description "Lesion segmentation in B-mode ultrasound (trained on simulated images)" \
		--input-size 256x256 --color gray --data synthetic:ultrasound --samples 16
	$(PY) -m edgescope.runtime.client.demo --bundle $(DEMO_BUNDLE) --source "dicom:$(ECHO_CINE)" \
		--save $(OUT)/demo_overlay.mp4 --summary $(OUT)/demo_summary.json

# The echo cine's Segmentation and Measurement Report stored in a local Orthanc (Debian: orthanc
# orthanc-dicomweb) by STOW-RS, and read back from it.
demo-archive: $(STAMP)
	test -d $(DEMO_BUNDLE) || $(MAKE) demo
	$(PY) -m edgescope.runtime.client.demo_archive --bundle $(DEMO_BUNDLE) --source "dicom:$(ECHO_CINE)" \
		--summary $(OUT)/archive_summary.json

# Two registered synthetic sources (white light at 30 fps, NIR fluorescence at 25 fps, 960x540 so that
# both fit a 2-core machine) into the example fusion model; the server pairs their frames by capture time.
FUSION_BUNDLE := bundles/fluorescence-fusion
demo-fusion: $(STAMP)
	$(VENV)/bin/edgescope export --name fluorescence-fusion --out $(FUSION_BUNDLE) --overwrite \
		--factory examples/fluorescence_fusion/model.py:build --weights examples/fluorescence_fusion/weights.pt \
		--description "Perfused tissue from white-light and NIR fluorescence endoscopy (trained on simulated frames)" \
		--input-name white --input-size 256x256 --color rgb --data synthetic:endoscopy --samples 8 \
		--labels background,perfused --frame-source white \
		--source-input nir:128x128:gray=synthetic:fluorescence
	$(PY) -m edgescope.runtime.client.demo --bundle $(FUSION_BUNDLE) \
		--source "white=synthetic:endoscopy?frames=300&fps=30&height=540&width=960" \
		--source "nir=synthetic:fluorescence?frames=250&fps=25&height=540&width=960" \
		--save $(OUT)/fusion_overlay.mp4 --summary $(OUT)/fusion_summary.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy reads the installed layout (edgescope.export lives in export/), so it
# checks a link tree that mirrors it.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs $(CURDIR)/edgescope build/typecheck/edgescope
	ln -s $(CURDIR)/export build/typecheck/edgescope/export
	ln -s $(CURDIR)/runtime build/typecheck/edgescope/runtime
	cd build/typecheck && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p edgescope

pytest: $(STAMP)
	$(VENV)/bin/pytest

test: lint typecheck pytest

# The documentation site, into build/site (its reference pages are generated from the code;
# tests/test_docs.py builds it with --strict too, so a broken link fails `make test`).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# JetPack 6 ships Python 3.10: install there without torch and run the suite on a bundle
# exported by the main environment (tests that export models skip).
PY310 ?= python3.10
VENV310 := .venv310
test-py310: $(STAMP)
	$(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install --quiet --upgrade pip
	$(VENV310)/bin/python -m pip install --quiet -e ".[test]"
	$(VENV)/bin/edgescope export --name lesion-unet --out build/py310/lesion-unet --overwrite \
		--factory examples/ultrasound_unet/model.py:build --weights examples/ultrasound_unet/weights.pt \
		--samples 4 > /dev/null
	EDGESCOPE_TEST_BUNDLE=build/py310/lesion-unet $(VENV310)/bin/pytest -p no:cacheprovider

proto: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) scripts/gen_proto.py

train: $(STAMP)
	$(PY) examples/ultrasound_unet/train.py

clean:
	rm -rf $(VENV) $(VENV310) build $(OUT)
